"""PEFT's module path `peft.tuners`: thin re-exports (the implementation is flat: smolpeft.lora, .tuner, .prompt)."""

from ..config import LoraConfig, PromptTuningConfig, PromptTuningInit  # noqa: F401
from ..prompt import PromptEmbedding  # noqa: F401
from ..tuner import LoraModel  # noqa: F401
from . import lora, prompt_tuning, tuners_utils  # noqa: F401
