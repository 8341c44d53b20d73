"""Data-parallel training under torchrun (gloo, 2 CPU processes started by the test)."""

import json
import os
import subprocess
import sys
import time

import peft
import pytest
import torch
import transformers

from smolpeft.checkpoint import read_weights

WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")


def _run(cfg: dict, nproc: int, crash: str | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, WORKER, json.dumps(cfg)] + ([crash] if crash else [])
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] + cmd[1:]
    env = os.environ | {"OMP_NUM_THREADS": "1", "SMOLPEFT_DIST_TIMEOUT": "60"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _cfg(lm, out, per_rank_batch, **kw):
    return dict(
        model=str(lm / "base"),
        data=str(lm / "pc.jsonl"),
        output_dir=str(out),
        max_steps=6,
        batch_size=per_rank_batch,
        grad_accum=2,
        lr=1e-2,
        dropout=0.0,
        log_every=1,
        **kw,
    )


def _losses(run_dir):
    return [m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def test_two_processes_match_one(lm, tmp_path):
    one = _run(_cfg(lm, tmp_path / "one", 4), nproc=1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(_cfg(lm, tmp_path / "two", 2, save_every=3), nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), abs=1e-5)
    a, b = read_weights(tmp_path / "one"), read_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    # rank 0 alone wrote: one checkpoint directory, one summary that knows the world size
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3"]
    summary = json.loads((tmp_path / "two/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(lm / "base"), tmp_path / "two"
    )
    assert model is not None


def test_resume_under_torchrun_and_a_failing_rank_ends_the_job(lm, tmp_path):
    full = _run(_cfg(lm, tmp_path / "full", 2, save_every=3), nproc=2)
    assert full.returncode == 0, full.stderr[-2000:]
    t0 = time.time()
    crashed = _run(_cfg(lm, tmp_path / "cut", 2, save_every=3), nproc=2, crash="1:4")
    assert crashed.returncode != 0 and time.time() - t0 < 120  # ended, not hung
    assert "simulated failure on rank 1 at step 4" in crashed.stderr
    resumed = _run(_cfg(lm, tmp_path / "cut", 2, save_every=3, resume=str(tmp_path / "cut/checkpoint-3")), nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = read_weights(tmp_path / "full"), read_weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def _assert_same_run(a_dir, b_dir, atol: float) -> None:
    """Two runs logged the same losses and saved the same adapter, to atol."""
    assert _losses(a_dir) == pytest.approx(_losses(b_dir), abs=atol)
    a, b = read_weights(a_dir), read_weights(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


def test_fsdp_shards_the_frozen_base_and_matches_one_process(lm, tmp_path):
    one = _run(_cfg(lm, tmp_path / "one", 4), nproc=1)
    assert one.returncode == 0, one.stderr[-2000:]
    cfg = _cfg(lm, tmp_path / "fsdp", 2, save_every=3, fsdp=True, gradient_checkpointing=True)
    two = _run(cfg, nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    _assert_same_run(tmp_path / "one", tmp_path / "fsdp", atol=1e-5)
    b = read_weights(tmp_path / "fsdp")
    # each rank held half of the base (FSDP pads a shard by at most a row per tensor)
    summary = json.loads((tmp_path / "fsdp/summary.json").read_text())
    base = transformers.AutoModelForCausalLM.from_pretrained(lm / "base")
    n_base = sum(p.numel() for p in base.parameters())
    assert n_base / 2 <= summary["fsdp_local_base_elements"] <= n_base / 2 + 2000
    # ... and read only that half from the checkpoint (sharded loading: built on meta, rows read per rank)
    assert 4 * n_base / 2 - 8000 <= summary["fsdp_local_base_bytes"] <= 4 * n_base / 2 + 8000
    assert len(summary["peak_rss_mb_per_rank"]) == 2
    assert sorted(p.name for p in (tmp_path / "fsdp").iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3"]
    # resuming the sharded run from its checkpoint lands on the same weights
    resumed = _run(cfg | {"output_dir": str(tmp_path / "fsdp"), "resume": str(tmp_path / "fsdp/checkpoint-3")}, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    c = read_weights(tmp_path / "fsdp")
    assert b.keys() == c.keys()
    for k in b:
        torch.testing.assert_close(b[k], c[k], atol=1e-6, rtol=0)
    assert peft.PeftModel.from_pretrained(base, tmp_path / "fsdp") is not None


def test_fsdp_refuses_methods_without_a_frozen_base():
    from smolpeft.train import TrainConfig

    with pytest.raises(ValueError, match="fsdp.*method='full'"):
        TrainConfig(method="full", fsdp=True)
    assert TrainConfig(method="qlora", fsdp=True).fsdp  # QLoRA's 4-bit base shards too (sharded loading)


def _quantized_bytes(model) -> int:
    """Bytes of a base whose decoder-block Linear weights are NF4 (half a byte an element), the rest fp32."""
    blocks = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    return sum(p.numel() // 2 if n.rsplit(".", 1)[0] in blocks else 4 * p.numel() for n, p in model.named_parameters())


def test_fsdp_qlora_matches_one_process_qlora(lm, tmp_path):
    one = _run(_cfg(lm, tmp_path / "one", 4, method="qlora"), nproc=1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(_cfg(lm, tmp_path / "two", 2, method="qlora", fsdp=True), nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    # the same NF4 bytes on both sides (each rank quantizes each weight whole, then keeps its rows), so only the
    # order of sums differs: far inside the quantization error (~1e-1 of a weight)
    _assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-4)
    summary = json.loads((tmp_path / "two/summary.json").read_text())
    n_bytes = _quantized_bytes(transformers.AutoModelForCausalLM.from_pretrained(lm / "base"))
    assert n_bytes / 2 - 8000 <= summary["fsdp_local_base_bytes"] <= n_bytes / 2 + 8000  # half the 4-bit base


def test_fsdp_rank_holds_half_the_base_in_memory(lm, tmp_path):
    import tiny

    # A base wide enough (~190 MB fp32, 16 blocks of 12 MB) that its size stands above the noise of RSS
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    wide = tmp_path / "wide"
    tiny.tokenizer(wide)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(wide)
    base_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    block_mb = sum(p.numel() * 4 for p in model.model.layers[0].parameters()) / 2**20
    del model
    run = _cfg(lm, tmp_path / "fsdp", 2, fsdp=True) | {"model": str(wide), "max_steps": 1, "grad_accum": 1}
    two = _run(run, nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    summary = json.loads((tmp_path / "fsdp/summary.json").read_text())
    # Measured here: 2 ranks, a 185 MiB base -> 110 MiB per rank (its half, 93, plus a gathered block and gloo's
    # buffers). Loading the whole base costs at least base_mb; the bound sits between, ~30 MiB above the measure.
    for mb in summary["base_rss_mb_per_rank"]:
        assert mb <= 0.75 * base_mb, (mb, base_mb, block_mb)
