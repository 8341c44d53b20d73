"""The training loss, computed lean: the LM head runs only on labelled positions, in chunks, so full-vocabulary
fp32 logits for the whole batch never exist at once."""

from __future__ import annotations

import torch
from torch import nn

IGNORE = -100


class LinearCrossEntropy(torch.autograd.Function):
    """Σ_t CE(h_t Wᵀ, y_t), chunk by chunk, with the gradients formed during the forward pass.

    d loss / d logits = softmax - onehot is known as soon as a chunk's logits are, so each chunk contributes
    (softmax - onehot) W to dh (and its transpose product to dW if the head trains) and its logits are freed:
    the head costs its two matmuls and chunk x vocab memory, not tokens x vocab fp32 logits kept for backward.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None  # None under no_grad (evaluation)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for i in range(0, y.numel(), chunk):
            hc, yc = h[i : i + chunk], y[i : i + chunk]
            logits = (hc @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # in place: the logits are not needed any more
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
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gw = (grad_w * grad_out).to(grad_h.dtype) if ctx.has_grad_w else None
        return grad_h * grad_out.to(grad_h.dtype), gw, None, None


def _lean_ok(base: nn.Module) -> bool:
    """Models whose logits are exactly hidden @ Wᵀ: a plain bias-free Linear head (not wrapped by an adapter), no
    softcapping or logit scaling after it."""
    cfg = base.config
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return (
        hasattr(base, "get_decoder")
        and type(head) is nn.Linear
        and head.bias is None
        and not getattr(cfg, "final_logit_softcapping", None)
        and getattr(cfg, "logit_scale", 1.0) in (None, 1.0)
    )


class TrainingLoss(nn.Module):
    """Wraps the model for training: forward(**batch) returns the scalar loss (and is what DDP wraps).

    For causal LMs the loss is Σ CE(head(h_t), y_{t+1}) over labelled t, divided by their count, exactly the
    transformers loss, computed by LinearCrossEntropy in chunks of `chunk` positions.
    """

    def __init__(self, model: nn.Module, lean: bool = True, chunk: int = 256):
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.lean = lean and _lean_ok(base) and not getattr(model, "prompt_encoder", None)
        self.chunk = chunk

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, outputs: bool = False):
        if outputs or not self.lean or labels.dim() != 2:
            # The model's own loss; with outputs=True its whole output (logits too), for evaluation through this
            # wrapper. Packed rows: transformers only builds the per-example mask when no KV cache is being filled.
            extra = {} if position_ids is None else {"position_ids": position_ids, "use_cache": False}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)
            return out if outputs else out.loss
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = base.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        h, y = hidden[:, :-1][keep], targets[keep]  # the head never sees prompt or padding positions
        head = base.get_output_embeddings()
        total = LinearCrossEntropy.apply(h, head.weight, y, self.chunk)
        return total / max(y.numel(), 1)
