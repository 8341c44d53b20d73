"""PEFT's module path `peft.tuners.lora.config`."""

from ...config import LoraConfig  # noqa: F401
from ...surface import unsupported

BdLoraConfig = unsupported("BdLoraConfig")
LoftQConfig = unsupported("LoftQConfig")
EvaConfig = unsupported("EvaConfig")
LoraRuntimeConfig = unsupported("LoraRuntimeConfig")
