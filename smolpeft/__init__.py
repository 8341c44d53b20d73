"""smolpeft: LoRA, QLoRA and prompt tuning with Hugging Face PEFT's API and adapter format."""

from .config import LoraConfig, PeftConfig, PeftType, PromptTuningConfig, PromptTuningInit, TaskType, load_config
from .model import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForSequenceClassification,
    get_peft_model,
)

__version__ = "0.1.0"

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSequenceClassification",
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForSequenceClassification",
    "PeftType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "get_peft_model",
    "load_config",
]
