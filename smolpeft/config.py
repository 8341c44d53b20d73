"""Adapter configs: dataclasses with Hugging Face PEFT's field names, defaults and JSON form."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class PeftType(str, enum.Enum):
    LORA = "LORA"
    PROMPT_TUNING = "PROMPT_TUNING"


class TaskType(str, enum.Enum):
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PromptTuningInit(str, enum.Enum):
    RANDOM = "RANDOM"
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"


# target_modules=None resolves through this table, keyed by `model.config.model_type`.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt"],
        ["q_proj", "v_proj"],
    ),
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    **dict.fromkeys(["bert", "roberta", "xlm-roberta"], ["query", "value"]),
    **dict.fromkeys(["gpt_neox", "falcon"], ["query_key_value"]),
}

# PEFT fields that change the math when set; we refuse them rather than silently computing something else.
_UNSUPPORTED_IF_SET = {"use_qalora", "alora_invocation_tokens", "trainable_token_indices"}


# Fields PEFT writes with these values that mean "feature off" (or only record PEFT's version).
_PEFT_BOOKKEEPING = {"peft_type": None, "peft_version": None, "auto_mapping": None, "megatron_core": "megatron.core", "qalora_group_size": 16}


def _is_off(key: str, value: Any) -> bool:
    if key in _PEFT_BOOKKEEPING:
        return _PEFT_BOOKKEEPING[key] in (None, value)
    return value in (None, False, {}, [])


@dataclass
class _Base:
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, enum.Enum):
                d[k] = v.value
            elif isinstance(v, (set, tuple)):
                d[k] = sorted(v)
        return {"peft_type": self.peft_type.value, **d}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from .checkpoint import atomic_write

        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write(os.path.join(directory, CONFIG_NAME), text.encode())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, subfolder: str | None = None) -> LoraConfig | PromptTuningConfig:
        return load_config(os.path.join(directory, subfolder) if subfolder else directory)


@dataclass
class LoraConfig(_Base):
    """LoRA: W x + (lora_alpha / r) · B A x, with B (out×r) zero-initialised so training starts at the base model."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None  # list: exact or dotted-suffix names; str: full-match regex
    exclude_modules: list[str] | str | None = None
    bias: str = "none"  # "none", "all" (every bias of the model trains) or "lora_only" (biases of the targeted layers)
    use_rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    init_lora_weights: bool | str = True  # True, False, "gaussian", "pissa", "olora"
    modules_to_save: list[str] | None = None  # whole modules trained and saved next to the adapter
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False  # set automatically for GPT-2's Conv1D; kept for config compatibility
    use_dora: bool = False  # DoRA: W' = m · (W + s·B A) / ||W + s·B A||, with a trained magnitude m per output
    lora_bias: bool = False  # lora_B gets a trained bias (merged into the base layer's bias)

    @property
    def peft_type(self) -> PeftType:
        return PeftType.LORA

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias={self.bias!r}; expected 'none', 'all' or 'lora_only'")
        if self.lora_bias and self.init_lora_weights not in (True, False):  # PEFT's two refusals
            raise ValueError(f"lora_bias=True needs init_lora_weights True or False, got {self.init_lora_weights!r}")
        if self.lora_bias and self.use_dora:
            raise ValueError("lora_bias=True is not supported with use_dora=True (as in PEFT)")
        if self.init_lora_weights not in (True, False, "gaussian", "pissa", "olora"):
            raise ValueError(
                f"LoraConfig.init_lora_weights={self.init_lora_weights!r}; expected True, False, 'gaussian', 'pissa' or 'olora'"
            )
        for k, v in self.rank_pattern.items():
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{k!r}] must be a positive integer, got {v!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.task_type is not None:
            self.task_type = TaskType(self.task_type).value

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass
class PromptTuningConfig(_Base):
    """Prompt tuning: `num_virtual_tokens` trainable embeddings prepended to every input."""

    num_virtual_tokens: int | None = None
    prompt_tuning_init: str = PromptTuningInit.RANDOM.value
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    token_dim: int | None = None  # filled from the model; checked when loading
    num_transformer_submodules: int | None = None  # always 1 here (decoder-only or encoder-only models)
    num_attention_heads: int | None = None
    num_layers: int | None = None

    @property
    def peft_type(self) -> PeftType:
        return PeftType.PROMPT_TUNING

    def __post_init__(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ValueError(
                f"PromptTuningConfig.num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}"
            )
        self.prompt_tuning_init = PromptTuningInit(self.prompt_tuning_init).value
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path")
        if self.task_type is not None:
            self.task_type = TaskType(self.task_type).value


PeftConfig = LoraConfig | PromptTuningConfig
_CLASSES = {PeftType.LORA.value: LoraConfig, PeftType.PROMPT_TUNING.value: PromptTuningConfig}


def config_from_dict(d: dict[str, Any], source: str = "config") -> PeftConfig:
    """Build a config from PEFT's JSON form; unknown fields are dropped with one warning."""
    peft_type = d.get("peft_type")
    if peft_type not in _CLASSES:
        raise ValueError(f"{source}: peft_type={peft_type!r} is not supported; expected one of {sorted(_CLASSES)}")
    cls = _CLASSES[peft_type]
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(k for k in _UNSUPPORTED_IF_SET if d.get(k))
    if bad:
        raise ValueError(f"{source}: {', '.join(f'{k}={d[k]!r}' for k in bad)} is not supported by smolpeft")
    # PEFT writes every field it has; the ones that are off (None/False/empty) carry no information.
    unknown = sorted(k for k, v in d.items() if k not in known and not _is_off(k, v))
    if unknown:
        warnings.warn(f"{source}: ignoring fields smolpeft does not use: {', '.join(unknown)}", stacklevel=3)
    try:
        return cls(**{k: v for k, v in d.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


def load_config(directory: str | os.PathLike) -> PeftConfig:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory not found: {directory}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return config_from_dict(d, source=path)
