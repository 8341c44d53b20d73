"""QLoRA on the bitsandbytes CPU backend: training, peft parity over the same 4-bit base, merging back to float."""

import json

import peft
import pytest
import tiny
import torch
import transformers

import smolpeft
from smolpeft.cli import main
from smolpeft.qlora import bnb_config, dequantize

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A Llama-shaped model wide enough for bitsandbytes' CPU blocks (64), with a local tokenizer."""
    d = tmp_path_factory.mktemp("q")
    tiny.llama(vocab=300, width=128).save_pretrained(d)
    tiny.tokenizer(d)
    with open(d / "chat.jsonl", "w") as f:
        for a in range(6):
            for b in range(6):
                f.write(json.dumps({"prompt": f"{a} plus {b} is", "completion": f" {a + b} ."}) + "\n")
    return d


def _4bit(d):
    return transformers.AutoModelForCausalLM.from_pretrained(d, quantization_config=bnb_config())


def test_qlora_step_lowers_the_loss_and_only_adapters_train(base_dir):
    model = smolpeft.get_peft_model(_4bit(base_dir), smolpeft.LoraConfig(r=8, target_modules="all-linear"))
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    model.train()
    losses = tiny.train_steps(model, tiny.ids(vocab=300), steps=5, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05
    assert {n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_adapter_matches_peft_over_the_same_4bit_base_and_merges_to_float(base_dir, tmp_path):
    ours = smolpeft.get_peft_model(
        _4bit(base_dir), smolpeft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(_4bit(base_dir), tmp_path)
    assert (
        ours.get_nb_trainable_parameters()[1] == theirs.get_nb_trainable_parameters()[1]
    )  # 4-bit params counted alike
    x = tiny.ids(vocab=300)
    with torch.no_grad():
        quantized = ours(input_ids=x).logits
        torch.testing.assert_close(theirs(input_ids=x).logits, quantized, atol=1e-5, rtol=0)
    # merged into a dequantized fp32 copy: equal to 4-bit + adapter up to the CPU kernel's bf16 rounding
    merged = dequantize(ours).merge_and_unload()
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    with torch.no_grad():
        assert (merged(input_ids=x).logits - quantized).abs().max() < 2e-2
    # the same adapter over the full-precision base: loads, and peft agrees on the outputs
    full = smolpeft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), tmp_path)
    ref = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=x).logits, ref(input_ids=x).logits, atol=1e-5, rtol=0)


def test_qlora_cli_train_and_merge(base_dir, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            "--method",
            "qlora",
            "--model",
            str(base_dir),
            "--data",
            str(base_dir / "chat.jsonl"),
            "--output-dir",
            str(run),
            "--max-steps",
            "6",
            "--batch-size",
            "8",
            "--lr",
            "1e-2",
            "--targets",
            "all-linear",
        ]
    )
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert 0 < summary["model_footprint_mb"] and summary["peak_rss_mb"] > 0
    assert (
        main(
            [
                "merge",
                "--adapter",
                str(run),
                "--load-4bit",
                "--dtype",
                "bf16",
                "--atol",
                "0.1",
                "--output-dir",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    assert "(bf16)" in capsys.readouterr().out
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert merged.dtype == torch.bfloat16 and not hasattr(merged.config, "quantization_config")


def test_4bit_footprint_on_smollm2_shapes(tmp_path):
    """The SmolLM2-135M architecture (random weights): NF4 base at most 0.35x its fp32 size."""
    cfg = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    full = transformers.LlamaForCausalLM(cfg)
    fp32 = full.get_memory_footprint()
    full.save_pretrained(tmp_path)
    del full
    ratio = _4bit(tmp_path).get_memory_footprint() / fp32
    assert ratio <= 0.35, ratio
