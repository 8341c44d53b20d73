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
# Positions per head matmul. One vocab x chunk fp32 buffer is the most the loss holds at once (49,152 x 128 is 25 MB,
# under glibc's 32 MB cap for reusing freed mmapped blocks, so chunks after the first take no fresh page faults).
# Chosen for memory: whole steps with 128 and with 256 measured the same time within this machine's noise.
CHUNK = 128

# Config attributes by which a model scales or caps its logits after the head (Gemma, Cohere, Granite, Falcon-H1,
# MiniCPM): logits are then not hidden @ Wᵀ, so the lean loss would differ.
_SCALED = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


class LinearLogProbs(torch.autograd.Function):
    """log p(y_t | h_t) = z_{t,y} - logsumexp(z_t) for logits z_t = W h_t, chunk by chunk, with the gradients formed
    during the forward pass; optionally each position's entropy and whether y_t is the argmax (TRL's metrics).

    d log p / d z = onehot - softmax is known as soon as a chunk's logits are, so each chunk's (softmax - onehot) W
    is kept per position (tokens x hidden) and its logits are freed: the head costs its two matmuls and vocab x chunk
    memory, not tokens x vocab fp32 logits kept for backward (nor a third matmul to recompute them). Backward scales
    each position's row by its incoming gradient, so any per-token weighting of the log-probs is exact. dW (a head
    that trains) is summed during the forward pass and so needs the same gradient at every position, as a summed
    loss gives it.
    A chunk's logits are computed vocab-major, W hᵀ (vocab x chunk): with MKL on this project's CPU that product
    ran at 0.64x the time of h Wᵀ (a wide, short output), the same values; the reductions then run over dim 0.
    """

    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int, grads: bool, metrics: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        n = y.numel()
        logp = torch.empty(n, dtype=torch.float32, device=h.device)
        entropy = torch.empty(n if metrics else 0, dtype=torch.float32, device=h.device)
        top1 = torch.empty(n if metrics else 0, dtype=torch.bool, device=h.device)
        # `grads`: whether autograd is on outside (inside forward it is always off, and needs_input_grad still
        # says True under no_grad), so evaluation skips the gradient matmul, as costly as the logits one.
        grad_h = torch.empty_like(h) if grads and ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if grads and ctx.needs_input_grad[1] else None
        for i in range(0, n, chunk):
            hc, yc = h[i : i + chunk], y[i : i + chunk]
            cols = torch.arange(yc.numel(), device=h.device)
            logits = (weight @ hc.T).float()  # vocab x chunk
            if metrics:
                top1[i : i + chunk] = logits.argmax(dim=0) == yc  # the first maximum, as TRL counts it
            # log p = z_y - max - log Σ exp(z - max), and the gradient softmax(z) - onehot(y), all in the one buffer
            # (torch.logsumexp would allocate a second vocab x chunk temporary).
            z_y = logits[yc, cols]
            top = logits.amax(dim=0)
            e = logits.sub_(top).exp_()
            total = e.sum(dim=0)
            logp[i : i + chunk] = z_y - top - total.log()
            if metrics:  # H = log Σ e - Σ p log e, with e = exp(z - max), p = e / Σ e; entr(e) = -e log e
                entropy[i : i + chunk] = total.log() + torch.special.entr(e).sum(dim=0) / total
            if grad_h is None and grad_w is None:
                continue  # under no_grad (evaluation): the values are all that is wanted
            probs = e.div_(total)
            probs[yc, cols] -= 1
            probs = probs.to(h.dtype)
            if grad_h is not None:
                grad_h[i : i + chunk] = probs.T @ weight
            if grad_w is not None:
                grad_w += (probs @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(top1)  # entropy is not: a loss that uses it gets an error in backward, below
        return logp, entropy, top1

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None, *_) -> tuple:
        if grad_entropy is not None:
            raise RuntimeError(
                "LinearLogProbs: the entropy is computed for logging; a loss that differentiates it is not supported "
                "(detach it, as TRL's SFTTrainer does)"
            )
        grad_h, grad_w = ctx.saved_tensors
        if grad_logp is None:
            return None, None, None, None, None, None
        gh = grad_h * -grad_logp.to(grad_h.dtype)[:, None] if grad_h is not None else None
        gw = None
        if grad_w is not None:
            g = grad_logp.reshape(-1)[:1]
            if not torch.equal(grad_logp, g.expand_as(grad_logp)):
                raise RuntimeError(
                    "LinearLogProbs: a trainable LM head needs the same gradient at every position (a summed loss); "
                    "these log-probs were weighted per token"
                )
            gw = (grad_w * -g).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None


def token_log_probs(
    h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int = CHUNK, metrics: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(y_t | h_t), entropy_t, y_t is the argmax) per position, the head h Wᵀ never materialized (see
    LinearLogProbs); entropy and argmax are empty unless `metrics`. Gradients are formed only when autograd will ask
    for them."""
    return LinearLogProbs.apply(h, weight, y, chunk, torch.is_grad_enabled(), metrics)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Σ_t CE(h_t Wᵀ, y_t): the summed negative log-probs of `token_log_probs`."""
    return -token_log_probs(h, weight, y, chunk)[0].sum()


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


def _labelled(base: nn.Module, labels: torch.Tensor | None, shift_labels: torch.Tensor | None, *args, **kwargs):
    """Run the decoder; return its output, the head, and each position's hidden state and target (shifted as
    transformers' ForCausalLMLoss shifts them; `shift_labels` are already shifted, as context parallelism passes them)
    with the mask of labelled positions."""
    kwargs.pop("return_dict", None)
    kwargs.pop("logits_to_keep", None)
    out = base.get_decoder()(*args, **kwargs)
    hidden = out.last_hidden_state
    h, targets = (hidden[:, :-1], labels[:, 1:]) if shift_labels is None else (hidden, shift_labels)
    head = base.get_output_embeddings()
    targets = targets.to(head.weight.device)
    return out, head, h.to(head.weight.device), targets, targets != IGNORE


def _mean(total: torch.Tensor, keep: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """Divided by `num_items_in_batch` when the Trainer passes it (gradient accumulation), else by the labelled
    count; an all-ignored batch gives 0 (transformers: nan)."""
    if num_items_in_batch is None:
        return total / keep.sum().clamp(min=1)
    return total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)


def causal_lm_forward(
    base: nn.Module,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    chunk: int = CHUNK,
    **kwargs,
) -> LeanCausalLMOutput:
    """`base(**kwargs, labels=labels)` of a transformers causal LM (see `lean_ok`), with the loss computed lean.

    The loss is Σ CE(head(h_t), y_{t+1}) over labelled t, over `_mean`'s count: exactly transformers' ForCausalLMLoss.
    """
    out, head, h, targets, keep = _labelled(base, labels, shift_labels, **kwargs)
    loss = _mean(linear_cross_entropy(h[keep], head.weight, targets[keep], chunk), keep, num_items_in_batch)
    rest = {f.name: getattr(out, f.name, None) for f in dataclasses.fields(CausalLMOutputWithPast)[2:]}
    output = LeanCausalLMOutput(loss=loss, **rest)
    output.__dict__["_pending"] = (head, out.last_hidden_state)
    return output


def fused_head_forward(
    base: nn.Module,
    *args,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """What TRL's `fused_lm_head=True` forward returns (see `smolpeft.trl`), from `token_log_probs`: the loss as
    `causal_lm_forward`'s, and per position (zero where the label is -100) the label's log-prob, the entropy and
    whether the label is the argmax, with the mask of labelled positions."""
    if labels is None and shift_labels is None:
        raise ValueError("fused_lm_head=True needs labels (or shift_labels) to score")
    kwargs["use_cache"] = False
    _, head, h, targets, keep = _labelled(base, labels, shift_labels, *args, **kwargs)
    logp, entropy, top1 = token_log_probs(h[keep], head.weight, targets[keep], metrics=True)
    log_probs = logp.new_zeros(keep.shape).masked_scatter(keep, logp)  # stays connected when nothing is labelled
    return {
        "loss": _mean(-log_probs.sum(), keep, num_items_in_batch),
        "log_probs": log_probs,
        "entropy": entropy.new_zeros(keep.shape).masked_scatter(keep, entropy),
        "is_top1": top1.new_zeros(keep.shape).masked_scatter(keep, top1),
        "label_mask": keep,
    }


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
