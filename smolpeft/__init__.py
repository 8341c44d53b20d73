"""smolpeft: LoRA, QLoRA and prompt tuning with Hugging Face PEFT's API, object graph and adapter format."""

from . import optimizers, tuners, utils  # noqa: F401  (PEFT's deep module paths: peft.tuners.lora, peft.utils, ...)
from .checkpoint import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from .config import (
    EvaConfig,
    LoraConfig,
    PeftConfig,
    PeftType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    load_config,
)
from .convert import convert_to_lora, save_as_lora
from .loraplus import create_loraplus_optimizer
from .model import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from .prompt import PromptEmbedding
from .qlora import prepare_model_for_kbit_training
from .surface import UNSUPPORTED_CONFIGS, PeftWarning, unsupported
from .tuner import LoraModel, inject_adapter_in_model

__version__ = "0.1.0"

# PEFT's other methods: importable, so PEFT scripts' import lines work; building one raises and names it.
globals().update({name: unsupported(name) for name in UNSUPPORTED_CONFIGS})
PeftMixedModel = unsupported("PeftMixedModel")

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSequenceClassification",
    "EvaConfig",
    "LoraConfig",
    "LoraModel",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
    "PromptEmbedding",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "convert_to_lora",
    "create_loraplus_optimizer",
    "get_peft_model",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "set_base_model_state_dict",
    "inject_adapter_in_model",
    "load_config",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "save_as_lora",
    "set_peft_model_state_dict",
]
