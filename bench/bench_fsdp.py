"""f) FSDP sharded loading on CPU (gloo): per-rank peak RSS of `smolpeft train --fsdp` at 1, 2 and 4 ranks, LoRA and
QLoRA, on a wide random-weight Llama saved once to a temporary directory.

Each run is `torchrun --nproc-per-node N -m smolpeft train ...` in fresh processes; every rank reports its ru_maxrss
(summary.json's peak_rss_mb_per_rank), what loading the base added to it (base_rss_mb_per_rank: the peak up to the
first step minus the RSS just before loading) and the base bytes it holds. 1 rank is the plain one-process run (the
whole base loaded by from_pretrained). The FSDP runs' peak RSS is fitted as c + part / world.

    python bench/bench_fsdp.py                       # hidden 1024, MLP 4096, 8 layers (~490 MB fp32 base)
    python bench/bench_fsdp.py --worlds 1,2 --layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def build(d: str, hidden: int, intermediate: int, layers: int) -> int:
    """A wide Llama with random weights, a local tokenizer and arithmetic prompt/completion data; returns base bytes."""
    import tiny
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny.tokenizer(os.path.join(d, "base"))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(os.path.join(d, "base"))
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    with open(os.path.join(d, "pc.jsonl"), "w") as f:
        for a in range(8):
            for b in range(8):
                f.write(json.dumps({"prompt": f"what is {a} plus {b} ?", "completion": f" {a + b} ."}) + "\n")
    return n_bytes


def run(d: str, method: str, world: int, steps: int, global_batch: int) -> dict:
    out = os.path.join(d, f"{method}-{world}")
    args = ["-m", "smolpeft", "train", "--model", os.path.join(d, "base"), "--data", os.path.join(d, "pc.jsonl")]
    args += ["--method", method, "--output-dir", out, "--max-steps", str(steps), "--log-every", "1", "--overwrite"]
    args += ["--batch-size", str(global_batch // world), "--lr", "1e-2", "--lora-dropout", "0"]
    if world > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *args, "--fsdp"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.time()
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"{method} x{world} failed:\n{p.stderr[-3000:]}")
    summary = json.load(open(os.path.join(out, "summary.json")))
    losses = [m["loss"] for m in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in m]
    return {
        "rss": summary["peak_rss_mb_per_rank"],
        "base_rss": summary["base_rss_mb_per_rank"],
        "local": summary["fsdp_local_base_bytes"],
        "losses": losses,
        "wall": time.time() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--worlds", default="1,2,4", help="world sizes for LoRA (1 = one process, no FSDP)")
    p.add_argument("--qlora-worlds", default="1,2", help="world sizes for QLoRA ('' to skip)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=4)
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        base = build(d, a.hidden, a.intermediate, a.layers)
        mib = base / 2**20
        print(f"base: Llama hidden {a.hidden}, MLP {a.intermediate}, {a.layers} layers, {mib:,.1f} MiB fp32\n")
        for method, worlds in (("lora", a.worlds), ("qlora", a.qlora_worlds)):
            results = {int(w): run(d, method, int(w), a.steps, a.global_batch) for w in worlds.split(",") if w}
            ref = results.get(1)
            fsdp = sorted(w for w in results if w > 1)
            # per-rank RSS = overhead + part / world: two FSDP runs fix both (the 1-process run has no gloo, no FSDP)
            part = None
            if len(fsdp) >= 2:
                w1, w2 = fsdp[0], fsdp[-1]
                r1, r2 = max(results[w1]["rss"]), max(results[w2]["rss"])
                part = (r1 - r2) / (1 / w1 - 1 / w2)
            for w, r in sorted(results.items()):
                dl = max(abs(x - y) for x, y in zip(r["losses"], ref["losses"])) if ref and w > 1 else None
                rows.append(
                    f"| {method} | {w} | {'no' if w == 1 else 'yes'} | "
                    + (f"{r['local'] / 2**20:,.1f}" if r["local"] is not None else "whole")
                    + f" | {' / '.join(f'{x:,.0f}' for x in r['base_rss'])}"
                    + f" | {' / '.join(f'{x:,.0f}' for x in r['rss'])} | "
                    + (f"{max(r['rss']) - max(ref['rss']):+,.0f}" if ref and w > 1 else "")
                    + f" | {'' if dl is None else f'{dl:.1e}'} | {r['wall']:.0f} |"
                )
            if part is not None:
                rows.append(f"| {method} | fit | | | | peak RSS ≈ c + {part:,.0f} MiB / world | | | |")
    print(
        "| method | ranks | fsdp | base held per rank (MiB) | RSS for the base per rank (MiB) "
        "| peak RSS per rank (MiB) | vs 1 process | max loss diff vs 1 process | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
