"""Shared bench helpers: the SmolLM2-135M shape with random weights, alternating timed rounds, tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time

import torch


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M has 30; fewer for quick runs)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    return p


def smollm2(layers: int = 30, seed: int = 0):
    """SmolLM2-135M's architecture: Llama, hidden 576, MLP 1536, 9 heads, 3 KV heads, vocab 49152, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(cfg).eval()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _reset_hwm() -> bool:
    """Linux (4.0+): reset the kernel's peak-RSS mark to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory above the level at entry. Where Linux lets the process reset its high-water mark, the
    kernel's own mark (exact: no short peak is missed, and nothing from before entry, such as building the model,
    counts); elsewhere sampled every millisecond by a thread."""

    def __enter__(self):
        self.base = self.peak = rss_mb()
        self.exact = _reset_hwm()
        self._stop = False
        self._t = None if self.exact else threading.Thread(target=self._watch, daemon=True)
        if self._t:
            self._t.start()
        return self

    def _watch(self):
        while not self._stop:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        if self._t:
            self._t.join()
        self.peak = max(self.peak, _hwm_mb() if self.exact else rss_mb())
        self.delta = self.peak - self.base


def alternate(contenders: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each contender once per round, in turn, so machine noise hits all of them alike; the order rotates each
    round, so no contender always runs first or right after the same neighbour."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            fn = contenders[k]
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def median(xs) -> float:
    return statistics.median(xs)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def report(name: str, rows: list[dict], key_line: str, extra: dict | None = None) -> None:
    """JSON, then a markdown table, then one line with the key ratio (last line of output)."""
    print(json.dumps({"bench": name, "machine": machine(), "rows": rows, **(extra or {})}, indent=2))
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    print("\n" + key_line)
