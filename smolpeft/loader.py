"""One loader for every entry point: base model + optional adapter directory + options -> a ready model and tokenizer.

The trainer, the CLI, the serving engine and the experiments all call `load`, so they agree on the task type, the
classification labels, quantization and the tokenizer. Adapters go through the public PeftModel API only.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from . import storage
from .checkpoint import read_weights
from .config import PeftConfig, TaskType, load_config
from .model import PeftModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

QUANTIZATIONS = ("nf4",)
HEAD_WEIGHTS = ("classifier.weight", "score.weight")  # the classification head, as an adapter saves it


class Loaded(NamedTuple):
    model: nn.Module  # a PeftModel when an adapter was given, else the transformers model
    tokenizer: PreTrainedTokenizerBase  # with a pad token
    task_type: TaskType  # SEQ_CLS or CAUSAL_LM
    base: str  # the base model's directory or Hub id


def detect_task_type(base: str, adapter_config: PeftConfig | None = None) -> TaskType:
    """SEQ_CLS if the adapter says so or the base is a *ForSequenceClassification model, else CAUSAL_LM."""
    if adapter_config is not None and adapter_config.task_type in (TaskType.SEQ_CLS, TaskType.CAUSAL_LM):
        return TaskType(adapter_config.task_type)
    import transformers

    archs = transformers.AutoConfig.from_pretrained(base).architectures or []
    return TaskType.SEQ_CLS if any(a.endswith("ForSequenceClassification") for a in archs) else TaskType.CAUSAL_LM


def adapter_labels(adapter: str) -> list[str] | None:
    """The label names an adapter was trained with: its label file, checked against the size of its saved head."""
    head = next((v.shape[0] for k, v in read_weights(adapter).items() if k.endswith(HEAD_WEIGHTS)), None)
    names = storage.read_labels(adapter)
    if names is not None and head is not None and head != len(names):
        raise ValueError(f"{adapter}: {storage.LABELS_NAME} names {len(names)} labels, the adapter's head has {head}")
    if names is None and head is not None:
        names = [f"LABEL_{i}" for i in range(head)]  # transformers' own default names
    return names


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """The tokenizer at `source`, with the EOS token as pad token when it has none (causal LMs often do not)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(source)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load(
    base: str | None = None,
    adapter: str | None = None,
    *,
    task_type: TaskType | str | None = None,
    labels: list[str] | None = None,
    quantize: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> Loaded:
    """Load `base` (default: the adapter's base_model_name_or_path), then the adapter in `adapter` if given.

    task_type: default from the adapter's config, else from the base's architecture. labels: the classification
    head's label names in order; default the adapter's saved labels (a head of another size is replaced). quantize:
    "nf4" loads the base in 4-bit (bitsandbytes). device: where to put the model (default: where transformers
    loads it); "meta" builds the model without reading any weight, for sharded training (`shard.fill` reads each
    rank's part later). The tokenizer comes from the adapter directory when it holds one, else from the base.
    """
    import transformers

    if base is None and adapter is None:
        raise ValueError("give a base model and/or an adapter directory")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r}; expected one of {', '.join(QUANTIZATIONS)} or None")
    config = load_config(adapter) if adapter else None
    base = base or config.base_model_name_or_path
    if not base:
        raise ValueError(f"{adapter}/adapter_config.json has no base_model_name_or_path; give the base model")
    task_type = TaskType(task_type) if task_type else detect_task_type(base, config)
    has_tok = adapter and os.path.exists(os.path.join(adapter, "tokenizer_config.json"))
    tok = load_tokenizer(adapter if has_tok else base)

    if device == "meta" and (adapter or task_type != TaskType.CAUSAL_LM):
        raise ValueError("device='meta' (sharded loading) builds a causal LM base, without an adapter")
    if device == "meta":
        from .shard import skeleton, to_4bit

        model = skeleton(transformers.AutoModelForCausalLM, base, dtype)
        if quantize == "nf4":
            to_4bit(model)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        return Loaded(model.eval(), tok, task_type, base)
    kw: dict = {"dtype": dtype} if dtype is not None else {}
    if quantize == "nf4":
        from .qlora import bnb_config

        kw["quantization_config"] = bnb_config()
        if device is not None:
            kw["device_map"] = {"": device}  # bitsandbytes quantizes while it places the weights
    if task_type == TaskType.SEQ_CLS:
        labels = labels if labels is not None else (adapter_labels(adapter) if adapter else None)
        if labels is not None:
            kw |= {
                "num_labels": len(labels),
                "id2label": dict(enumerate(labels)),
                "label2id": {n: i for i, n in enumerate(labels)},
                "ignore_mismatched_sizes": True,
            }  # a head for other labels is replaced (by the adapter's, if any)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(base, **kw)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(base, **kw)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if device is not None and quantize is None:
        model.to(device)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter, adapter_name=adapter_name, is_trainable=is_trainable)
    return Loaded(model.eval(), tok, task_type, base)
