"""The training loss, computed lean: the LM head runs only on labelled positions, in chunks, so full-vocabulary
fp32 logits for the whole batch never exist at once."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE = -100
# Positions per head matmul. One chunk x vocab fp32 buffer is the most the loss holds at once (128 x 49,152 is
# 25 MB). Chosen for memory: steps with 128 and with 256 measured the same time within this machine's noise.
CHUNK = 128

# Config attributes by which a model scales or caps its logits after the head (Gemma, Cohere, Granite, Falcon-H1,
# MiniCPM): logits are then not hidden @ Wᵀ, so the lean loss would differ.
_SCALED = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


class LinearCrossEntropy(torch.autograd.Function):
    """Σ_t CE(h_t Wᵀ, y_t), chunk by chunk, with the gradients formed during the forward pass.

    d loss / d logits = softmax - onehot is known as soon as a chunk's logits are, so each chunk contributes
    (softmax - onehot) W to dh (and its transpose product to dW if the head trains) and its logits are freed:
    the head costs its two matmuls and chunk x vocab memory, not tokens x vocab fp32 logits kept for backward.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None  # None under no_grad (evaluation)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for i in range(0, y.numel(), chunk):
            hc, yc = h[i : i + chunk], y[i : i + chunk]
            logits = (hc @ weight.T).float()
            # CE = log Σ exp(z - max) + max - z_y, and its gradient softmax(z) - onehot(y), all in the one buffer
            # (torch.logsumexp would allocate a second chunk x vocab temporary).
            z_y = logits.gather(1, yc[:, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            loss += (total.log() + top - z_y[:, None]).sum()
            probs.div_(total)
            probs[torch.arange(yc.numel(), device=h.device), yc] -= 1
            probs = probs.to(h.dtype)
            if grad_h is not None:
                grad_h[i : i + chunk] = probs @ weight
            if grad_w is not None:
                grad_w += (probs.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_grad_w = grad_w is not None
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        grad_h, grad_w = ctx.saved_tensors
        gw = (grad_w * grad_out).to(grad_h.dtype) if ctx.has_grad_w else None
        return grad_h * grad_out.to(grad_h.dtype), gw, None, None


def lean_ok(base: nn.Module) -> bool:
    """Causal LMs whose forward is decoder -> plain bias-free Linear head (not wrapped by an adapter) -> transformers'
    causal-LM loss: no logit scaling or softcapping, no MoE auxiliary loss, no custom loss function."""
    from transformers.loss.loss_utils import LOSS_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = getattr(base, "config", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return (
        cfg is not None
        and type(base).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        and hasattr(base, "get_decoder")
        and type(head) is nn.Linear
        and head.bias is None
        and all(getattr(cfg, k, None) in (None, 1.0) for k in _SCALED)
        and not getattr(cfg, "output_router_logits", False)
        and getattr(base, "loss_function", None) is LOSS_MAPPING.get("ForCausalLM")
    )


def lean_applies(base: nn.Module, kwargs: dict) -> bool:
    """Whether a forward with labels and these extra kwargs may take the lean path.

    Only with autograd on: that is where the batch x vocab logits would be kept for backward. Without it the model's
    own forward runs, so evaluation code that collects `outputs.items()` still finds the logits there. TRL's fused
    head (`fused_lm_head=True`) already computes its loss lean, so those calls pass through untouched.
    """
    return (
        torch.is_grad_enabled()
        and not kwargs.get("fused_lm_head")
        and not kwargs.get("output_router_logits")
        and kwargs.get("return_dict", True) is not False
        and not kwargs.get("logits_to_keep")
        and lean_ok(base)
    )


class LeanCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast whose logits are computed from the last hidden state when first read (`.logits`,
    `["logits"]`, positional indexing): code that reads only the loss never pays for batch x seq x vocab logits.
    Until then `keys()`/`items()` list only what exists, so recursive output walkers (accelerate's fp32 cast under
    mixed precision, DDP) do not build them either."""

    @property
    def logits(self) -> torch.Tensor | None:
        pending = self.__dict__.pop("_pending", None)
        if pending is not None:
            head, hidden = pending
            self.__dict__["_logits"] = value = head(hidden)
            OrderedDict.__setitem__(self, "logits", value)  # then moved back to its field's place, as in transformers
            names = [f.name for f in dataclasses.fields(self)]
            for name in names[names.index("logits") + 1 :]:
                if OrderedDict.__contains__(self, name):
                    self.move_to_end(name)
        return self.__dict__.get("_logits")

    @logits.setter
    def logits(self, value: torch.Tensor | None) -> None:
        self.__dict__["_logits"] = value

    def __getitem__(self, k):
        if k == "logits" or not isinstance(k, str):
            self.logits  # noqa: B018 - reading it computes it
        return super().__getitem__(k)

    def to_tuple(self) -> tuple:
        self.logits  # noqa: B018
        return super().to_tuple()

    def __contains__(self, key) -> bool:
        return key == "logits" and "_pending" in self.__dict__ or super().__contains__(key)


def causal_lm_forward(
    base: nn.Module,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    chunk: int = CHUNK,
    **kwargs,
) -> LeanCausalLMOutput:
    """`base(**kwargs, labels=labels)` of a transformers causal LM (see `lean_ok`), with the loss computed lean.

    The loss is Σ CE(head(h_t), y_{t+1}) over labelled t, divided by `num_items_in_batch` when the Trainer passes
    it (gradient accumulation) or else by the labelled count: exactly transformers' ForCausalLMLoss. `shift_labels`
    are already-shifted targets, as context parallelism passes them.
    """
    kwargs.pop("return_dict", None)
    kwargs.pop("logits_to_keep", None)
    out = base.get_decoder()(**kwargs)
    hidden = out.last_hidden_state
    if shift_labels is None:
        h, targets = hidden[:, :-1], labels[:, 1:]
    else:
        h, targets = hidden, shift_labels
    head = base.get_output_embeddings()
    targets = targets.to(head.weight.device)
    keep = targets != IGNORE
    total = LinearCrossEntropy.apply(h.to(head.weight.device)[keep], head.weight, targets[keep], chunk)
    if num_items_in_batch is None:
        loss = total / keep.sum().clamp(min=1)  # an all-ignored batch gives 0 (transformers: nan)
    else:
        loss = total / (
            num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        )
    rest = {f.name: getattr(out, f.name, None) for f in dataclasses.fields(CausalLMOutputWithPast)[2:]}
    output = LeanCausalLMOutput(loss=loss, **rest)
    output.__dict__["_pending"] = (head, hidden)
    return output


class TrainingLoss(nn.Module):
    """Wraps the model for training: forward(**batch) returns the scalar loss (and is what DDP wraps).

    For causal LMs the loss is `causal_lm_forward`'s, in chunks of `chunk` positions, with or without autograd, so
    evaluation is lean too.
    """

    def __init__(self, model: nn.Module, lean: bool = True, chunk: int = CHUNK):
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.lean = lean and lean_ok(base) and not getattr(model, "prompt_encoder", None)
        self.chunk = chunk

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        outputs: bool = False,
    ) -> Any:
        if outputs or not self.lean or labels.dim() != 2:
            # The model's own loss; with outputs=True its whole output (logits too), for evaluation through this
            # wrapper. Packed rows: transformers only builds the per-example mask when no KV cache is being filled.
            extra = {} if position_ids is None else {"position_ids": position_ids, "use_cache": False}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)
            return out if outputs else out.loss
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return causal_lm_forward(base, labels, chunk=self.chunk, **batch).loss
