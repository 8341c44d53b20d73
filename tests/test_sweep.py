"""Experiments on tiny models: the sweep table and plots, and the prompt-init comparison with its task matrix."""

import csv
import dataclasses
import json

import pytest
import tiny
import transformers

from smolpeft.cli import main
from smolpeft.sweep import compare_init, sweep
from smolpeft.train import TrainConfig, bundled_model


def test_sweep_table_plots_and_reproducibility(lm, tmp_path):
    base = TrainConfig(model=str(lm / "base"), data=str(lm / "pc.jsonl"), max_steps=3, batch_size=8, lr=1e-2)
    rows = sweep(base, str(tmp_path / "a"), ranks=(1, 2, 4), methods=("lora", "full", "prompt"), log=lambda *_: None)
    assert [(r["method"], r["rank"]) for r in rows] == [
        ("lora", 1),
        ("lora", 2),
        ("lora", 4),
        ("full", None),
        ("prompt", None),
    ]
    p = {r["rank"]: r["trainable_params"] for r in rows if r["rank"]}
    assert p[2] == 2 * p[1] and p[4] == 4 * p[1]  # LoRA parameters grow linearly with rank
    full = next(r for r in rows if r["method"] == "full")
    assert full["trainable_params"] == sum(x.numel() for x in tiny.llama(vocab=300).parameters())
    assert full["pct_of_total"] == pytest.approx(100)
    assert all(r["size_on_disk_bytes"] > 0 and r["peak_rss_mb"] > 0 and r["metric"] == "eval_loss" for r in rows)
    with open(tmp_path / "a/results.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    assert len(json.loads((tmp_path / "a/results.json").read_text())) == 5
    assert (tmp_path / "a/results.md").read_text().count("\n") == 7
    for png in ("metric_vs_rank.png", "params_vs_metric.png", "loss_curves.png"):
        assert (tmp_path / "a" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = sweep(base, str(tmp_path / "b"), ranks=(1, 2, 4), methods=("lora", "full", "prompt"), log=lambda *_: None)
    assert [r["value"] for r in again] == [r["value"] for r in rows]  # same seed, same numbers


def test_compare_init_matrix_and_switching(tmp_path):
    d = tmp_path / "bert"
    transformers.AutoTokenizer.from_pretrained(bundled_model()).save_pretrained(d)
    cfg = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    transformers.BertForSequenceClassification(cfg).save_pretrained(d)
    base = TrainConfig(model=str(d), max_steps=2, batch_size=16)
    out = compare_init(
        base,
        str(tmp_path / "r"),
        tasks=("sentiment", "intent"),
        inits=("RANDOM", "TEXT", "SAMPLE_VOCAB"),
        token_counts=(2,),
        log=lambda *_: None,
    )
    assert len(out["runs"]) == 6
    matrix = out["serving"]["matrix"]
    assert sorted(matrix) == sorted(
        f"{t}-{i}" for t in ("sentiment", "intent") for i in ("random", "text", "sample_vocab")
    )
    assert all(set(v) == {"sentiment", "intent"} and all(0 <= x <= 1 for x in v.values()) for v in matrix.values())
    assert out["serving"]["switch_ms_median"] < 5
    assert all(b < out["serving"]["full_model_bytes"] for b in out["serving"]["adapter_bytes"].values())
    for f in ("init_results.md", "init_results.csv", "serving.md", "init_comparison.png", "task_matrix.png"):
        assert (tmp_path / "r" / f).stat().st_size > 0

    # one task: matplotlib then returns a single Axes, not an array of them; the report must still be written
    rc = main(
        [
            "compare-init",
            "--model",
            str(d),
            "--tasks",
            "sentiment",
            "--inits",
            "RANDOM",
            "--token-counts",
            "2",
            "--max-steps",
            "1",
            "--output-dir",
            str(tmp_path / "one"),
        ]
    )
    assert rc == 0
    assert (tmp_path / "one/init_comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_dirs_are_never_mixed_or_destroyed(lm, tmp_path):
    import os

    from smolpeft import storage

    base = TrainConfig(model=str(lm / "base"), data=str(lm / "pc.jsonl"), max_steps=1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("a user's file")
    for overwrite, msg in [(False, "is not empty"), (True, "is not a smolpeft output")]:
        with pytest.raises(ValueError, match=msg):  # refused before any training
            sweep(dataclasses.replace(base, overwrite=overwrite), str(tmp_path / "mine"), log=lambda *_: None)
    # an old report whose runs/ holds a user's directory is not replaced, even with overwrite
    storage.commit_dir(
        tmp_path / "old", lambda d: os.makedirs(os.path.join(d, "runs", "x")), "report", ["results.*", "runs"]
    )
    (tmp_path / "old/runs/x/notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="runs/x is not a smolpeft output"):
        compare_init(dataclasses.replace(base, overwrite=True), str(tmp_path / "old"), log=lambda *_: None)
    assert (tmp_path / "mine/notes.txt").exists() and (tmp_path / "old/runs/x/notes.txt").exists()
