"""smolpeft.hf_trainer.Trainer: transformers' Trainer saving and resuming smolpeft adapters, peft as the oracle."""

import os

import pytest
import torch
import transformers
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, TrainingArguments

import smolpeft
from smolpeft.hf_trainer import Trainer

peft = pytest.importorskip("peft")

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def data(lm):
    tok = AutoTokenizer.from_pretrained(lm / "base")
    texts = [f"what is {a} plus {b} ? {a} plus {b} is {a + b} ." for a in range(6) for b in range(6)]
    return tok, Dataset.from_dict({"input_ids": [tok(t).input_ids for t in texts]})


def _trainer(lm, data, out, model=None, cls=Trainer, **kw):
    tok, ds = data
    model = model or smolpeft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(lm / "base"), smolpeft.LoraConfig(**LORA)
    )
    kw = {"max_steps": 4} | kw
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        save_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        report_to="none",
        seed=0,
        **kw,
    )
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    return cls(model=model, args=args, train_dataset=ds, data_collator=collator, processing_class=tok)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_checkpoints_are_adapters_and_resume(lm, data, tmp_path):
    torch.manual_seed(0)
    full = _trainer(lm, data, tmp_path)
    full.train()
    for step in (2, 4):
        files = set(os.listdir(tmp_path / f"checkpoint-{step}"))
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "optimizer.pt"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}

    # peft reads the checkpoint back: same logits as the trained model
    tok, _ = data
    ids = tok("what is 2 plus 3 ?", return_tensors="pt").input_ids
    full.model.eval()
    with torch.no_grad():
        want = full.model(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(lm / "base"), tmp_path / "checkpoint-4"
        )
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)

    # resuming from checkpoint-2 (into a freshly initialised adapter) ends where the uninterrupted run did
    torch.manual_seed(1)
    resumed = _trainer(lm, data, tmp_path)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    torch.testing.assert_close(torch.tensor(_losses(resumed)[-2:]), torch.tensor(_losses(full)[-2:]), atol=1e-6, rtol=0)
    a = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, a[name], atol=1e-6, rtol=0)

    resumed.save_model(str(tmp_path / "final"))
    assert set(os.listdir(tmp_path / "final")) >= {"adapter_config.json", "adapter_model.safetensors"}


def test_losses_match_peft_under_trainer(lm, data, tmp_path):
    """The lean loss in PeftModel.forward, with Trainer's num_items_in_batch and gradient accumulation, gives the
    losses that transformers' own loss gives a peft model with the same initial adapter."""
    ours = smolpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(lm / "base"), smolpeft.LoraConfig(**LORA))
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(lm / "base"), peft.LoraConfig(**LORA))
    ours.save_pretrained(tmp_path / "init")
    theirs.load_adapter(str(tmp_path / "init"), "default", is_trainable=True)  # the same starting adapter
    kw = dict(gradient_accumulation_steps=2, save_strategy="no", max_steps=2)
    a = _trainer(lm, data, tmp_path / "a", ours, **kw)
    b = _trainer(lm, data, tmp_path / "b", theirs, cls=transformers.Trainer, **kw)  # the oracle: the stock Trainer
    a.train()
    b.train()
    torch.testing.assert_close(torch.tensor(_losses(a)), torch.tensor(_losses(b)), atol=1e-5, rtol=0)
