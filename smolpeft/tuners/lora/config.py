"""PEFT's module path `peft.tuners.lora.config`."""

from ...config import CordaConfig, EvaConfig, LoraConfig  # noqa: F401
from ...surface import unsupported

# LoRA sub-configs for initializations and variants smolpeft does not implement: importable, refused when used.
BdLoraConfig = unsupported("BdLoraConfig")
LoftQConfig = unsupported("LoftQConfig")
ArrowConfig = unsupported("ArrowConfig")
LoraRuntimeConfig = unsupported("LoraRuntimeConfig")
