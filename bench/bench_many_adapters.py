"""g) Many adapters in one server: the engine's tokens/s with 1, 8, 64 and 256 distinct adapters in flight (256
requests each time, up to --max-batch rows at once, --cache adapters loaded, the others read back from their files
on demand), and memory vs adapters registered (RSS and the model's adapter bytes, each point a fresh process), with
the LRU cache and with every adapter loaded. Writes a PNG and prints markdown tables.

    python bench/bench_many_adapters.py                      # SmolLM2-135M shape, 30 layers
    python bench/bench_many_adapters.py --layers 2 --requests 64 --tokens 4 --registered 0,16,64  # a quick check
"""

import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import machine, median, parser, rss_mb, smollm2  # noqa: E402


def word_tokenizer(vocab: int):
    """One word per id, so every generated id decodes; no EOS, so every request runs to max_tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def write_adapters(root: str, n: int, layers: int, rank: int, targets: list[str]) -> list[str]:
    """n PEFT-format adapters with their own random factors (so none is the identity), written as safetensors."""
    from safetensors.torch import load_file, save_file

    import smolpeft

    cfg = smolpeft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    smolpeft.get_peft_model(smollm2(layers), cfg).save_pretrained(f"{root}/template")
    template = load_file(f"{root}/template/adapter_model.safetensors")
    config = open(f"{root}/template/adapter_config.json").read()
    paths = []
    for i in range(n):
        d = f"{root}/a{i}"
        os.makedirs(d)
        with open(f"{d}/adapter_config.json", "w") as f:
            f.write(config)
        g = torch.Generator().manual_seed(i)
        save_file(
            {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in template.items()}, f"{d}/adapter_model.safetensors"
        )
        paths.append(d)
    return paths


def engine_for(layers: int, max_batch: int, cache: int | None):
    from smolpeft.engine import Engine

    base = smollm2(layers)
    base.generation_config.eos_token_id = None
    return Engine(base, word_tokenizer(base.config.vocab_size), "smollm2-shape", max_batch, max_loaded_adapters=cache)


def adapter_bytes(engine) -> int:
    from smolpeft.lora import lora_layers

    return sum(
        t.numel() * t.element_size() for _, m in lora_layers(engine.model) for n in m.r for t in m.adapter_params(n)
    )


def probe(args) -> None:
    """One memory point, in a process of its own: RSS after the base, then after registering N adapters."""
    torch.set_num_threads(args.threads)
    n, cache = args.probe
    engine = engine_for(args.layers, args.max_batch, cache or None)
    gc.collect()
    base_rss = rss_mb()
    for i in range(n):
        engine.load_adapter(f"a{i}", f"{args.dir}/a{i}")
    gc.collect()
    print(json.dumps({"rss_mb": rss_mb(), "base_rss_mb": base_rss, "adapter_mb": adapter_bytes(engine) / 2**20}))


def throughput(args, paths: list[str]) -> list[dict]:
    from smolpeft.engine import Request, SamplingParams

    engine = engine_for(args.layers, args.max_batch, args.cache)
    t0 = time.perf_counter()
    for i, path in enumerate(paths):
        engine.load_adapter(f"a{i}", path)
    register_s = (time.perf_counter() - t0) / len(paths)
    engine.start()
    g = torch.Generator().manual_seed(0)
    vocab = engine.vocab_size
    prompts = [torch.randint(3, vocab, (args.prompt,), generator=g).tolist() for _ in range(args.requests)]

    def run(k: int) -> float:
        reqs = [Request(p, f"a{j % k}", SamplingParams(args.tokens, temperature=0)) for j, p in enumerate(prompts)]
        t = time.perf_counter()
        for req in reqs:
            engine.submit(req)
        for req in reqs:
            req.done.wait()
            assert req.finish_reason == "length" and len(req.out_ids) == args.tokens, req.error
        return time.perf_counter() - t

    ks = args.inflight
    times, steps, loads = ({k: [] for k in ks} for _ in range(3))
    try:
        for r in range(args.rounds):  # the cases take turns, in a rotating order, so machine noise hits all alike
            for k in ks[r % len(ks) :] + ks[: r % len(ks)]:
                run(k)  # warm-up: the cache holds what a steady stream of this case keeps in it
                before = dict(engine.stats)
                times[k].append(run(k))
                steps[k].append(engine.stats["steps"] - before["steps"])
                loads[k].append(engine.stats["adapter_loads"] - before["adapter_loads"])
                print(json.dumps({"adapters_in_flight": k, "s": times[k][-1], "loads": loads[k][-1]}), flush=True)
    finally:
        engine.stop()
    tokens = args.requests * args.tokens
    rows = [
        {
            "adapters_in_flight": k,
            "median_s": median(times[k]),
            "tokens_per_s": tokens / median(times[k]),
            "decode_steps": median(steps[k]),
            "loads_per_run": median(loads[k]),
        }
        for k in ks
    ]
    one = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_one"] = r["tokens_per_s"] / one
    for r in rows:
        r["register_ms_per_adapter"] = register_s * 1000
    return rows


def memory(args) -> list[dict]:
    rows = []
    for n in args.registered:
        row = {"registered": n}
        for label, cache in (("cache", args.memory_cache), ("all", 0)):
            if label == "all" and n > args.all_loaded_max:
                continue
            cmd = [sys.executable, __file__, "--probe", str(n), str(cache), "--dir", args.dir]
            cmd += ["--layers", str(args.layers), "--threads", str(args.threads), "--max-batch", str(args.max_batch)]
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            row[f"rss_mb_{label}"] = out["rss_mb"]
            row[f"adapter_mb_{label}"] = out["adapter_mb"]
            row["base_rss_mb" if label == "cache" else "base_rss_mb_all"] = out["base_rss_mb"]  # each process's own
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def plot(args, speed: list[dict], mem: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    ks = [r["adapters_in_flight"] for r in speed]
    a.plot(ks, [r["tokens_per_s"] for r in speed], "o-")
    a.axhline(0.7 * speed[0]["tokens_per_s"], ls=":", c="gray", label="0.7x one adapter")
    a.axvline(args.cache, ls="--", c="C1", label=f"cache = {args.cache}")
    a.set(xscale="log", xlabel="distinct adapters in flight", ylabel="tokens/s", title="serving throughput")
    a.set_xticks(ks, [str(k) for k in ks])
    a.legend()
    ns = [r["registered"] for r in mem]
    above = [r["rss_mb_cache"] - r["base_rss_mb"] for r in mem]
    b.plot(ns, above, "o-", label=f"RSS above the base, cache {args.memory_cache}")
    b.plot(ns, [r["adapter_mb_cache"] for r in mem], "s--", label=f"adapters in the model, cache {args.memory_cache}")
    full = [r for r in mem if "rss_mb_all" in r]
    above = [r["rss_mb_all"] - r["base_rss_mb_all"] for r in full]
    b.plot([r["registered"] for r in full], above, "o-", label="RSS above the base, all loaded")
    b.plot([r["registered"] for r in full], [r["adapter_mb_all"] for r in full], "s--", label="adapters, all loaded")
    b.set(xlabel="adapters registered", ylabel="MB", title=f"memory (base RSS {mem[0]['base_rss_mb']:.0f} MB)")
    b.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M shape, {args.layers} layers, LoRA r={args.rank} on {','.join(args.targets)}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append(
            "| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + " |"
        )
    return "\n".join(lines)


def main():
    p = parser(__doc__)
    p.add_argument("--requests", type=int, default=256, help="requests per throughput run")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per request")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per request")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--cache", type=int, default=64, help="--max-loaded-adapters for the throughput runs")
    p.add_argument("--inflight", default="1,8,64,256", help="distinct adapters in flight, one run each")
    p.add_argument("--registered", default="0,16,64,256", help="adapters registered, one memory point each")
    p.add_argument("--memory-cache", type=int, default=16, help="--max-loaded-adapters for the memory points")
    p.add_argument("--all-loaded-max", type=int, default=64, help="largest N measured with every adapter loaded")
    p.add_argument("--out", default="bench/many_adapters.png")
    p.add_argument("--probe", type=int, nargs=2, help="internal: one memory point (N, cache; 0: all loaded)")
    p.add_argument("--dir", help="internal: the adapters' directory")
    p.set_defaults(rounds=2)
    args = p.parse_args()
    if args.probe:
        return probe(args)
    torch.set_num_threads(args.threads)
    args.targets = args.targets.split(",")
    args.inflight = [int(k) for k in args.inflight.split(",")]
    args.registered = [int(n) for n in args.registered.split(",")]
    n = max([*args.inflight, *args.registered])
    with tempfile.TemporaryDirectory() as d:
        args.dir = d
        paths = write_adapters(d, n, args.layers, args.rank, args.targets)
        speed = throughput(args, paths[: max(args.inflight)])
        mem = memory(args)
    args.dir = None
    plot(args, speed, mem)
    print(
        json.dumps(
            {"bench": "many_adapters", "machine": machine(), "args": vars(args), "speed": speed, "memory": mem},
            indent=2,
        )
    )
    print("\n" + table(speed) + "\n\n" + table(mem))
    at64 = next((r for r in speed if r["adapters_in_flight"] == 64), None)
    ratio = f"{at64['vs_one']:.3f}" if at64 else "n/a"
    print(f"\n64 distinct adapters in flight / one adapter = {ratio} (target >= 0.7); plot: {args.out}")


if __name__ == "__main__":
    main()
