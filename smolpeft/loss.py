"""The training loss, computed lean: the LM head runs only on labelled positions, in chunks, so full-vocabulary
fp32 logits for the whole batch never exist at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _lean_ok(base: nn.Module) -> bool:
    """Architectures whose logits are exactly head(hidden): no softcapping or logit scaling after the head."""
    cfg = base.config
    return (
        hasattr(base, "get_decoder")
        and base.get_output_embeddings() is not None
        and not getattr(cfg, "final_logit_softcapping", None)
        and getattr(cfg, "logit_scale", 1.0) in (None, 1.0)
    )


class TrainingLoss(nn.Module):
    """Wraps the model for training: forward(**batch) returns the scalar loss (and is what DDP wraps).

    For causal LMs the loss is Σ CE(head(h_t), y_{t+1}) over labelled t, divided by their count, exactly the
    transformers loss. Each chunk of `chunk` positions is checkpointed: its logits are recomputed in backward
    instead of being kept, so activation memory for the head is chunk × vocab, not tokens × vocab.
    """

    def __init__(self, model: nn.Module, lean: bool = True, chunk: int = 1024):
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.lean = lean and _lean_ok(base) and not getattr(model, "prompt_embeddings", None)
        self.chunk = chunk

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None) -> torch.Tensor:
        if not self.lean or labels.dim() != 2:
            # Packed rows: transformers only builds the per-example mask when no KV cache is being filled.
            extra = {} if position_ids is None else {"position_ids": position_ids, "use_cache": False}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra).loss
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = base.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        h, y = hidden[:, :-1][keep], targets[keep]  # the head never sees prompt or padding positions
        head = base.get_output_embeddings()
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, y.numel(), self.chunk):
            total = total + checkpoint(_ce_sum, head, h[i : i + self.chunk], y[i : i + self.chunk], use_reentrant=False)
        return total / max(y.numel(), 1)
