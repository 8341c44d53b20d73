"""PEFT's module paths `peft.mapping` / `peft.mapping_func`: thin re-exports, and PEFT's registries for the two
methods smolpeft implements."""

from .config import LoraConfig, PeftType, PromptTuningConfig
from .model import get_peft_model  # noqa: F401
from .tuner import LoraModel, inject_adapter_in_model  # noqa: F401

PEFT_TYPE_TO_CONFIG_MAPPING = {PeftType.LORA: LoraConfig, PeftType.PROMPT_TUNING: PromptTuningConfig}
PEFT_TYPE_TO_TUNER_MAPPING = {PeftType.LORA: LoraModel}
PEFT_TYPE_TO_PREFIX_MAPPING = {PeftType.LORA: LoraModel.prefix}
