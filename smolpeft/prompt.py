"""Prompt tuning: trainable virtual-token embeddings prepended to the input embeddings."""

from __future__ import annotations

import torch
from torch import nn

from .config import PromptTuningConfig


def init_prompt(config: PromptTuningConfig, word_embeddings: nn.Embedding) -> torch.Tensor:
    """The initial n×d prompt: random N(0,1) (nn.Embedding's default), embeddings of a text, or of sampled vocab ids."""
    n, (vocab, dim) = config.num_virtual_tokens, word_embeddings.weight.shape
    w = word_embeddings.weight.detach()
    # Drawn first in every mode so that a seed gives PEFT's numbers: PEFT always builds an nn.Embedding first.
    random = torch.randn(n, dim).to(w.device)
    if config.prompt_tuning_init == "TEXT":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
        ids = tok(config.prompt_tuning_init_text)["input_ids"]
        if not ids:
            raise ValueError("prompt_tuning_init_text tokenizes to nothing")
        ids = (ids * (n // len(ids) + 1))[:n]  # repeat the text to fill, then cut, as PEFT does
        return w[torch.tensor(ids, device=w.device)].float().clone()
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, vocab, (n,), dtype=torch.long).to(w.device)
        return w[ids].float().clone()
    return random


class PromptEmbedding(nn.Module):
    """An adapter's virtual tokens, as PEFT holds them: `embedding` is an n×d nn.Embedding (its weight is what the
    file calls `prompt_embeddings`)."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding):
        super().__init__()
        w = init_prompt(config, word_embeddings)
        self.embedding = nn.Embedding(w.shape[0], w.shape[1], _weight=w, device=w.device, dtype=w.dtype)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def prepend(
    prompts: torch.Tensor,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    token_type_ids: torch.Tensor | None = None,
    extend_labels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The one place virtual tokens join the input. prompts: (batch, n, d) or (n, d).

    The mask gets ones, token-level labels get -100 (no loss on virtual tokens), token types get zeros.
    """
    batch = inputs_embeds.shape[0]
    if prompts.dim() == 2:
        prompts = prompts.unsqueeze(0).expand(batch, -1, -1)
    n = prompts.shape[1]
    embeds = torch.cat([prompts.to(inputs_embeds.dtype), inputs_embeds], dim=1)

    def pad(t, value):
        return None if t is None else torch.cat([t.new_full((batch, n), value), t], dim=1)

    return embeds, pad(attention_mask, 1), pad(labels, -100) if extend_labels else labels, pad(token_type_ids, 0)
