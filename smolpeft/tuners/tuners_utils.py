"""PEFT's module path `peft.tuners.tuners_utils`: its base classes are smolpeft's one layer and one tuner."""

from ..lora import LoraLayer as BaseTunerLayer  # noqa: F401
from ..tuner import LoraModel as BaseTuner  # noqa: F401
