"""PEFT's module path `peft.tuners.prompt_tuning`."""

from ...config import PromptTuningConfig, PromptTuningInit  # noqa: F401
from ...prompt import PromptEmbedding  # noqa: F401
