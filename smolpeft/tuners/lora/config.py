"""PEFT's module path `peft.tuners.lora.config`."""

from ...config import LoraConfig  # noqa: F401
from ...surface import unsupported

# LoRA sub-configs for initializations and variants smolpeft does not implement: importable, refused when used.
BdLoraConfig = unsupported("BdLoraConfig")
LoftQConfig = unsupported("LoftQConfig")
EvaConfig = unsupported("EvaConfig")
CordaConfig = unsupported("CordaConfig")
ArrowConfig = unsupported("ArrowConfig")
LoraRuntimeConfig = unsupported("LoraRuntimeConfig")
