"""smolpeft.trl.SFTTrainer: the course's TRL code on smolpeft, with TRL + peft as the oracle."""

import os
import subprocess
import sys

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import smolpeft  # noqa: E402
from smolpeft.trl import SFTTrainer  # noqa: E402

# A chat template with generation markers, so assistant_only_loss can find the assistant's tokens.
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}<s>assistant: {{ m['content'] }}</s>"
    "{% endgeneration %}{% else %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def chat(lm):
    tok = AutoTokenizer.from_pretrained(lm / "base")
    tok.chat_template = TEMPLATE
    ds = Dataset.from_json(str(lm / "chat.jsonl"))
    return tok, ds


def _args(out, **kw):
    base = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_steps=2,
        learning_rate=1e-2,
        report_to="none",
        bf16=False,
    )  # fp32: TRL's default bf16 autocast is slow on CPU
    return trl.SFTConfig(**(base | kw))


def _losses(trainer):
    return _logged(trainer, "loss")


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def _peft_logits(base_dir, adapter_dir, ids):
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_course_notebook_runs_with_smolpeft_imports(lm, chat, tmp_path):
    """The smol-course PEFT notebook's calls, with `peft` -> `smolpeft` and trl's SFTTrainer -> smolpeft.trl's (and
    `warmup_ratio` spelled `warmup_steps=0.03`, as transformers 5 takes it; bf16 only where a GPU has it)."""
    from trl import SFTConfig

    from smolpeft import AutoPeftModelForCausalLM, LoraConfig

    tokenizer, dataset = chat
    model = AutoModelForCausalLM.from_pretrained(lm / "base")
    peft_config = LoraConfig(
        r=6, lora_alpha=8, lora_dropout=0.05, bias="none", target_modules="all-linear", task_type="CAUSAL_LM"
    )
    args = SFTConfig(
        output_dir=str(tmp_path / "ft"),
        num_train_epochs=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        packing=True,
        gradient_checkpointing=True,
        optim="adamw_torch_fused",
        learning_rate=2e-4,
        max_grad_norm=0.3,
        warmup_steps=0.03,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="epoch",
        bf16=torch.cuda.is_available(),
        push_to_hub=False,
        report_to="none",
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, peft_config=peft_config, processing_class=tokenizer
    )
    trainer.train()
    trainer.save_model()

    files = set(os.listdir(args.output_dir))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}  # an adapter, not the full model
    ckpt = [f for f in files if f.startswith("checkpoint-")]
    assert ckpt and "adapter_model.safetensors" in os.listdir(os.path.join(args.output_dir, ckpt[0]))

    loaded = AutoPeftModelForCausalLM.from_pretrained(args.output_dir)
    merged = loaded.merge_and_unload()
    ids = tokenizer("what is 2 plus 3 ?", return_tensors="pt").input_ids
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, _peft_logits(lm / "base", args.output_dir, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "options",
    [{"packing": True, "gradient_checkpointing": True}, {"assistant_only_loss": True}],
    ids=["packing+gc", "assistant_only"],
)
def test_losses_equal_trl_with_peft(lm, chat, tmp_path, options):
    """Same seed, fp32: the logged losses equal TRL + peft's (smolpeft's fused head, not TRL's, computing them), so do
    the entropy and token accuracy TRL logs from the head's per-token outputs, and the checkpoint is an adapter peft
    loads."""
    tok, ds = chat
    ours = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(lm / "base"),
        args=_args(tmp_path / "s", max_steps=3, **options),
        train_dataset=ds,
        processing_class=tok,
        peft_config=smolpeft.LoraConfig(**LORA),
    )
    theirs = trl.SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(lm / "base"),
        args=_args(tmp_path / "p", max_steps=3, **options),
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft.LoraConfig(**LORA),
    )
    fused = ours.model.get_base_model().forward.__func__.__code__  # functools.wraps leaves the code object alone
    assert fused.co_filename.endswith(os.path.join("smolpeft", "trl.py"))
    ours.train()
    theirs.train()
    assert _losses(ours) == _losses(theirs) and len(_losses(ours)) == 3
    for key in ("entropy", "mean_token_accuracy"):
        got, want = _logged(ours, key), _logged(theirs, key)
        assert len(got) == 3 and got == pytest.approx(want, rel=1e-4, abs=1e-6), key

    ckpt = tmp_path / "s" / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(os.listdir(ckpt))
    assert not (ckpt / "model.safetensors").exists()
    ours.save_model()
    ids = tok("what is 2 plus 3 ?", return_tensors="pt").input_ids
    ours.model.eval()
    with torch.no_grad():
        want = ours.model(input_ids=ids).logits
    torch.testing.assert_close(_peft_logits(lm / "base", tmp_path / "s", ids), want, atol=1e-5, rtol=1e-5)


def test_resume_from_checkpoint_continues_the_same_run(lm, chat, tmp_path):
    tok, ds = chat

    def trainer(out):
        return SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(lm / "base"),
            args=_args(out),
            train_dataset=ds,
            processing_class=tok,
            peft_config=smolpeft.LoraConfig(**LORA),
        )

    full = trainer(tmp_path / "full")
    full.train()
    resumed = trainer(tmp_path / "full")  # same output_dir: checkpoint-2 is there
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert _losses(resumed)[-2:] == _losses(full)[-2:]
    a = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, a[name], atol=0, rtol=0)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_smolpeft_model_as_model(lm, chat, tmp_path, method):
    """A PeftModel passed as `model`: TRL's fused head goes on the transformers model under the adapters."""
    tok, ds = chat
    config = (
        smolpeft.LoraConfig(**LORA)
        if method == "lora"
        else smolpeft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    )
    model = smolpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(lm / "base"), config)
    trainer = SFTTrainer(model=model, args=_args(tmp_path / "o", max_steps=2), train_dataset=ds, processing_class=tok)
    assert "forward" not in vars(trainer.model) and "forward" in vars(model.get_base_model())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert all(loss > 0 for loss in _losses(trainer))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    trainer.save_model()
    ids = tok("what is 2 plus 3 ?", return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    got = _peft_logits(lm / "base", tmp_path / "o", ids)
    if method == "prompt":
        got = got[:, config.num_virtual_tokens :]  # peft returns logits for the virtual tokens too
        want = want[:, -got.shape[1] :]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_trl_stays_optional():
    code = (
        "import sys; import smolpeft; assert 'trl' not in sys.modules, 'import smolpeft imported trl'\n"
        "sys.modules['trl'] = None\n"
        "try:\n    import smolpeft.trl\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "smolpeft[trl]" in out.stdout
