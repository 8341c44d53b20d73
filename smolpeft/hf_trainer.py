"""transformers' Trainer on smolpeft models: checkpoints hold adapters, and resuming reads them back.

transformers.Trainer saves adapters only for `peft.PeftModel`; any other model becomes a full `model.safetensors`
at every checkpoint, which `resume_from_checkpoint` then cannot load into a smolpeft model. `AdapterCheckpoints` is
a Trainer mixin that overrides the Trainer's two file hooks (`_save`, `_load_from_checkpoint`, plus
`_load_best_model`) for smolpeft models and leaves every other model to the Trainer; `Trainer` is
transformers.Trainer with it.
"""

from __future__ import annotations

import inspect
import os

import torch
import transformers
from torch import nn

from .model import PeftModel

TRAINING_ARGS_NAME = "training_args.bin"  # transformers' name, so its tooling finds the arguments
_SCRATCH = "_smolpeft_resume"


def unwrap(model: nn.Module | None) -> PeftModel | None:
    """The smolpeft PeftModel inside DDP/accelerate wrappers, or None for any other model."""
    while (
        model is not None and not isinstance(model, PeftModel) and isinstance(getattr(model, "module", None), nn.Module)
    ):
        model = model.module
    return model if isinstance(model, PeftModel) else None


def load_adapter_in_place(model: PeftModel, path: str | os.PathLike) -> None:
    """Copy the active adapter saved under `path` (PEFT layout: "default" at the root, others in a subfolder) into
    the live adapter tensors, so that an optimizer or scheduler built on them keeps working.

    It goes through the public API: the files load into a scratch adapter, whose tensors match the active one's by
    name with the adapter-name component swapped, and the scratch adapter is deleted again.
    """
    name = model.active_adapter
    src = str(path) if name == "default" else os.path.join(path, name)
    model.load_adapter(src, _SCRATCH)
    try:
        params = dict(model.named_parameters())
        copied = 0
        with torch.no_grad():
            for key, value in params.items():
                parts = key.split(".")
                if _SCRATCH in parts:
                    params[".".join(name if p == _SCRATCH else p for p in parts)].copy_(value)
                    copied += 1
        if not copied:
            raise ValueError(f"{src} holds no tensors for adapter {name!r}")
    finally:
        model.delete_adapter(_SCRATCH)
        model.set_adapter(name)


class AdapterCheckpoints:
    """Trainer mixin (put it first in the bases) for smolpeft models.

    - `save_model()` and every `checkpoint-N` write the adapter in PEFT's format (adapter_config.json +
      adapter_model.safetensors), the tokenizer and training_args.bin, not the full model;
    - `resume_from_checkpoint` and `load_best_model_at_end` copy the saved adapter back into the live tensors;
    - with gradient checkpointing the embeddings' output requires grad, as PEFT models get from TRL: reentrant
      checkpointing back-propagates only into blocks whose input requires grad, and the embeddings are frozen.
    """

    def __init__(self, *args, **kwargs):
        model = unwrap(kwargs.get("model", args[0] if args else None))
        if model is not None and getattr(model, "is_quantized", False):
            # transformers lets a quantized (QLoRA) model train only when it sees adapters attached to it
            model._hf_peft_config_loaded = True
        super().__init__(*args, **kwargs)
        model = unwrap(self.model)
        if model is not None and self.args.gradient_checkpointing:
            model.get_base_model().enable_input_require_grads()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = unwrap(self.model)
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        peft = unwrap(model if model is not None else self.model)
        if peft is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_in_place(peft, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        peft = unwrap(self.model)
        if peft is None:
            return super()._load_best_model()
        load_adapter_in_place(peft, self.state.best_model_checkpoint)


class Trainer(AdapterCheckpoints, transformers.Trainer):
    """transformers.Trainer that saves smolpeft models as adapters and resumes from them; otherwise the same."""

    def _set_signature_columns_if_needed(self) -> None:
        # Dataset columns are kept when the model's forward names them. PeftModel.forward takes **kwargs, so read the
        # transformers model's signature (as the Trainer does for peft models): position_ids and the like survive.
        model = unwrap(self.model)
        if self._signature_columns is None and model is not None:
            own = inspect.signature(PeftModel.forward).parameters
            base = inspect.signature(model.get_base_model().forward).parameters
            names = [n for n in [*base, *own] if n not in ("self", "kwargs")]
            self._signature_columns = list(dict.fromkeys(names + ["label", "label_ids", *self.label_names]))
        super()._set_signature_columns_if_needed()
