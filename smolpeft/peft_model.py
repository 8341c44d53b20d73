"""PEFT's module path `peft.peft_model`: thin re-exports of smolpeft.model."""

from .model import (  # noqa: F401
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
