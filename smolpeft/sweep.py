"""Experiments: LoRA ranks against full fine-tuning and prompt tuning; prompt-tuning inits across tasks, with
every adapter evaluated on every task and switched on one shared base."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from . import storage
from .config import TaskType
from .train import TrainConfig, pyplot, quiet_libraries, save_figure, train

RANKS = (1, 2, 4, 8, 16, 32, 64)
REPORT_PATTERNS = ("results.*", "init_results.*", "serving.*", "*.png", "runs")  # what a report directory holds
COLUMNS = [
    "method",
    "rank",
    "trainable_params",
    "pct_of_total",
    "size_on_disk_bytes",
    "train_time_s",
    "tokens_per_s",
    "peak_rss_mb",
    "metric",
    "value",
]


def fresh_report_dir(out_dir: str, overwrite: bool) -> None:
    """An empty report directory. A used one is replaced only under overwrite, and only if it and every run in it
    are smolpeft's own outputs holding nothing else."""
    storage.check_output_dir(out_dir, overwrite)
    runs = os.path.join(out_dir, "runs")
    if os.path.isdir(runs):
        for name in os.listdir(runs):
            storage.check_output_dir(os.path.join(runs, name), overwrite)
    storage.commit_dir(out_dir, lambda _: None, "report", REPORT_PATTERNS)


def _train_quiet(cfg: TrainConfig) -> dict:
    import sys

    sys.stderr = open(os.devnull, "w")  # the parent shows one line per run; no bars from children
    quiet_libraries()
    return train(cfg, log=lambda *_: None)


def run_isolated(cfg: TrainConfig) -> dict:
    """Train in a fresh process: peak RSS is then this run's alone, and no state leaks between runs."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        return pool.submit(_train_quiet, cfg).result()


def _weights_size(directory: str) -> int:
    """Bytes of the weights a user would ship: the adapter file, or the whole model for full fine-tuning."""
    names = [n for n in os.listdir(directory) if n.endswith(".safetensors")]
    return sum(os.path.getsize(os.path.join(directory, n)) for n in names)


def _metric(after: dict) -> tuple[str, float]:
    return ("eval_accuracy", after["eval_accuracy"]) if "eval_accuracy" in after else ("eval_loss", after["eval_loss"])


def _write_table(rows: list[dict], out_dir: str, name: str, columns: list[str]) -> None:
    storage.atomic_write(os.path.join(out_dir, f"{name}.json"), (json.dumps(rows, indent=2) + "\n").encode())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    storage.atomic_write(os.path.join(out_dir, f"{name}.csv"), buf.getvalue().encode())

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    storage.atomic_write(os.path.join(out_dir, f"{name}.md"), ("\n".join(md) + "\n").encode())


def sweep(
    base: TrainConfig,
    out_dir: str,
    ranks: Sequence[int] = RANKS,
    methods: Sequence[str] = ("lora", "full", "prompt"),
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train `base` once per LoRA rank and once per other method, on the same data, steps and seed."""
    fresh_report_dir(out_dir, base.overwrite)
    runs = [(m, r) for m in methods for r in (ranks if m in ("lora", "dora", "qlora") else [None])]
    rows = []
    for i, (method, r) in enumerate(runs, 1):
        name = f"{method}-r{r}" if r else method
        cfg = dataclasses.replace(
            base,
            method=method,
            r=r or base.r,
            lora_alpha=None if r else base.lora_alpha,
            output_dir=os.path.join(out_dir, "runs", name),
            resume=None,
            save_every=0,
            overwrite=False,
        )
        s = run_isolated(cfg)
        metric, value = _metric(s["after"])
        rows.append(
            {
                "method": method,
                "rank": r,
                "trainable_params": s["trainable_params"],
                "pct_of_total": s["trainable_pct"],
                "size_on_disk_bytes": _weights_size(cfg.output_dir),
                "train_time_s": s["train_time_s"],
                "tokens_per_s": s["tokens_per_s"],
                "peak_rss_mb": s["peak_rss_mb"],
                "metric": metric,
                "value": value,
                "run_dir": cfg.output_dir,
            }
        )
        log(
            f"[{i}/{len(runs)}] {name}: {metric} {value:.4f}, {s['trainable_params']:,} trainable params, "
            f"{s['train_time_s']:.0f}s"
        )
    _write_table(rows, out_dir, "results", COLUMNS)
    _plot_sweep(rows, out_dir)
    return rows


def _plot_sweep(rows: list[dict], out_dir: str) -> None:
    plt = pyplot()
    metric = rows[0]["metric"]
    lora = sorted((r for r in rows if r["rank"]), key=lambda r: r["rank"])
    others = [r for r in rows if not r["rank"]]

    fig, ax = plt.subplots(figsize=(7, 4))
    for method in dict.fromkeys(r["method"] for r in lora):  # one rank line per LoRA method (lora, dora, qlora)
        line = [r for r in lora if r["method"] == method]
        ax.plot([r["rank"] for r in line], [r["value"] for r in line], "o-", label=method.upper())
    if lora:
        ax.set_xscale("log", base=2)
    for r, style in zip(others, ["--", ":", "-."]):
        ax.axhline(
            r["value"],
            linestyle=style,
            color="gray" if r["method"] == "full" else "tab:orange",
            label=f"{r['method']} ({r['trainable_params']:,} params)",
        )
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against LoRA rank")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, os.path.join(out_dir, "metric_vs_rank.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ax.scatter(r["trainable_params"], r["value"], color="tab:blue" if r["rank"] else "tab:red")
        ax.annotate(
            f"r={r['rank']}" if r["rank"] else r["method"],
            (r["trainable_params"], r["value"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.set_title("what each trainable parameter buys")
    ax.grid(alpha=0.3)
    save_figure(fig, os.path.join(out_dir, "params_vs_metric.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        with open(os.path.join(r["run_dir"], "metrics.jsonl")) as f:
            pts = [m for m in map(json.loads, f) if "loss" in m]
        ax.plot(
            [m["step"] for m in pts], [m["loss"] for m in pts], label=f"r={r['rank']}" if r["rank"] else r["method"]
        )
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("training loss")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, os.path.join(out_dir, "loss_curves.png"))


def compare_init(
    base: TrainConfig,
    out_dir: str,
    tasks: Sequence[str] = ("sentiment", "topic", "intent"),
    inits: Sequence[str] = ("RANDOM", "TEXT", "SAMPLE_VOCAB"),
    token_counts: Sequence[int] = (8, 20),
    log: Callable[[str], None] = print,
) -> dict:
    """Prompt tuning with each init and token count on each task; every adapter evaluated on every task.

    All tasks share one classification head over the union of their labels, so that every adapter fits one base
    model: that is also the multi-task server, switched per task with set_adapter and no reload.
    """
    from .data import load_builtin

    fresh_report_dir(out_dir, base.overwrite)
    labels = [lab for t in tasks for lab in load_builtin(t).labels]
    if len(set(labels)) != len(labels):
        raise ValueError(f"tasks {tasks} share label names; a shared head needs distinct labels")
    text = base.prompt_tuning_init_text or "Read the sentence and classify its sentiment, topic or intent."
    rows = []
    runs = [(t, i, n) for t in tasks for i in inits for n in token_counts]
    for k, (task, init, n) in enumerate(runs, 1):
        cfg = dataclasses.replace(
            base,
            task=task,
            data=None,
            method="prompt",
            prompt_tuning_init=init,
            num_virtual_tokens=n,
            prompt_tuning_init_text=text if init == "TEXT" else None,
            labels=labels,
            output_dir=os.path.join(out_dir, "runs", f"{task}-{init.lower()}-{n}"),
            resume=None,
            overwrite=False,
        )
        s = run_isolated(cfg)
        rows.append(
            {
                "task": task,
                "init": init,
                "virtual_tokens": n,
                "accuracy": s["after"]["eval_accuracy"],
                "accuracy_before": s["before"]["eval_accuracy"],
                "train_time_s": s["train_time_s"],
                "run_dir": cfg.output_dir,
            }
        )
        log(f"[{k}/{len(runs)}] {task} {init} n={n}: accuracy {s['after']['eval_accuracy']:.4f}")
    _write_table(
        rows, out_dir, "init_results", ["task", "init", "virtual_tokens", "accuracy", "accuracy_before", "train_time_s"]
    )
    serving = cross_task(rows, tasks, max(token_counts), base, out_dir, labels)
    _plot_inits(rows, serving, tasks, inits, out_dir)
    return {"runs": rows, "serving": serving}


def cross_task(
    rows: list[dict], tasks: Sequence[str], n: int, base: TrainConfig, out_dir: str, labels: list[str]
) -> dict:
    """Load every task's adapters into one base model; evaluate each on each task; time the switches."""
    import torch

    from .data import encode, load_builtin
    from .loader import load
    from .train import bundled_model, evaluate

    chosen = [r for r in rows if r["virtual_tokens"] == n]
    names = [f"{r['task']}-{r['init'].lower()}" for r in chosen]
    model, tok, _, _ = load(
        base.model or bundled_model(),
        chosen[0]["run_dir"],
        task_type=TaskType.SEQ_CLS,
        labels=labels,
        adapter_name=names[0],
    )
    for r, name in zip(chosen[1:], names[1:]):
        model.load_adapter(r["run_dir"], adapter_name=name)
    full_bytes = sum(p.numel() * p.element_size() for p in model.get_base_model().parameters())
    eval_sets = {}
    for t in tasks:
        ds = load_builtin(t)
        ds.labels = labels
        eval_sets[t] = encode(ds, "eval", tok, base.max_length)[0]
    matrix = {}
    for name in names:
        model.set_adapter(name)
        matrix[name] = {
            t: evaluate(model, eval_sets[t], TaskType.SEQ_CLS, tok.pad_token_id)["eval_accuracy"] for t in tasks
        }
    switches = []
    with torch.no_grad():
        for i in range(200):
            t0 = time.perf_counter()
            model.set_adapter(names[i % len(names)])
            switches.append(time.perf_counter() - t0)
    sizes = {name: _weights_size(r["run_dir"]) for r, name in zip(chosen, names)}
    serving = {
        "virtual_tokens": n,
        "matrix": matrix,
        "switch_ms_median": 1000 * statistics.median(switches),
        "adapter_bytes": sizes,
        "full_model_bytes": full_bytes,
    }
    storage.atomic_write(os.path.join(out_dir, "serving.json"), (json.dumps(serving, indent=2) + "\n").encode())
    md = [
        f"# Every adapter on every task (prompt tuning, {n} virtual tokens, accuracy)",
        "",
        "| adapter \\ task | " + " | ".join(tasks) + " | size on disk |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    md += [
        f"| {a} | " + " | ".join(f"{matrix[a][t]:.3f}" for t in tasks) + f" | {sizes[a] / 1024:.1f} KiB |"
        for a in names
    ]
    md += [
        "",
        f"A full copy of the model: {full_bytes / 2**20:.1f} MiB. Switching adapters on the shared base "
        f"(set_adapter, no reload): median {serving['switch_ms_median']:.4f} ms over 200 switches.",
    ]
    storage.atomic_write(os.path.join(out_dir, "serving.md"), ("\n".join(md) + "\n").encode())
    return serving


def _plot_inits(rows: list[dict], serving: dict, tasks: Sequence[str], inits: Sequence[str], out_dir: str) -> None:
    plt = pyplot()
    counts = sorted({r["virtual_tokens"] for r in rows})
    # squeeze=False: a 1 x k grid of axes even for one task (plain subplots returns a bare Axes then)
    fig, grid = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), sharey=True, squeeze=False)
    axes = list(grid[0])
    for ax, t in zip(axes, tasks):
        width = 0.8 / len(inits)
        for j, init in enumerate(inits):
            vals = [
                next(r["accuracy"] for r in rows if r["task"] == t and r["init"] == init and r["virtual_tokens"] == c)
                for c in counts
            ]
            ax.bar([i + j * width for i in range(len(counts))], vals, width, label=init)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(counts))], [f"{c} tokens" for c in counts])
        ax.set_title(t)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("held-out accuracy")
    axes[-1].legend(fontsize=8)
    save_figure(fig, os.path.join(out_dir, "init_comparison.png"))

    names = list(serving["matrix"])
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 3, 0.45 * len(names) + 1.5))
    data = [[serving["matrix"][a][t] for t in tasks] for a in names]
    im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(names)), names)
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xlabel("evaluated on")
    ax.set_title("adapter x task accuracy")
    fig.colorbar(im, ax=ax)
    save_figure(fig, os.path.join(out_dir, "task_matrix.png"))
