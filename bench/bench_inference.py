"""c) Inference on the SmolLM2-135M shape: merged vs base, unmerged LoRA overhead, a mixed batch of 8 adapters vs
one adapter, adapter load time from disk, and set_adapter switch time."""

import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import alternate, median, parser, report, smollm2  # noqa: E402


def main():
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import smolpeft

    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    kw = dict(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    base = smollm2(args.layers)
    merged_model = smolpeft.get_peft_model(smollm2(args.layers), smolpeft.LoraConfig(**kw)).merge_and_unload()
    lora = smolpeft.get_peft_model(smollm2(args.layers), smolpeft.LoraConfig(**kw))
    d = tempfile.mkdtemp()
    lora.save_pretrained(d)
    loads = []
    for i in range(1, 8):  # 8 adapters on one base; load time measured from disk each time
        t0 = time.perf_counter()
        lora.load_adapter(d, adapter_name=f"a{i}")
        loads.append(time.perf_counter() - t0)
    names = ["default"] + [f"a{i}" for i in range(1, 8)]
    # get_peft_model leaves the model in training mode (as peft does); inference is measured in eval mode.
    for m in (base, merged_model, lora):
        m.eval()

    def run(model, **kw):
        def f():
            with torch.no_grad():
                model(input_ids=ids, **kw)

        return f

    t = alternate(
        {
            "base": run(base),
            "merged": run(merged_model),
            "unmerged": run(lora),
            "mixed8": run(lora, adapter_names=[names[i % 8] for i in range(args.batch)]),
        },
        args.rounds,
    )
    switches = []
    for i in range(1000):
        t0 = time.perf_counter()
        lora.set_adapter(names[i % 8])
        switches.append(time.perf_counter() - t0)
    med = {k: median(v) for k, v in t.items()}
    # Ratios are paired within a round (the contenders ran back to back), then the median is taken over rounds.
    ratio = {k: median([a / b for a, b in zip(t[k], t["base"])]) for k in t}
    ratio["mixed8/single"] = median([b / a for a, b in zip(t["mixed8"], t["unmerged"])])
    rows = [{"case": k, "forward_s": v, "vs_base": ratio[k]} for k, v in med.items()]
    rows += [
        {"case": "load_adapter (median of 7)", "forward_s": statistics.median(loads), "vs_base": float("nan")},
        {"case": "set_adapter (median of 1000)", "forward_s": statistics.median(switches), "vs_base": float("nan")},
    ]
    key = (
        f"merged/base = {ratio['merged']:.3f} (target 1.00 +-0.03); unmerged/base = {ratio['unmerged']:.3f} "
        f"(target <= 1.10); mixed-8/single throughput = {ratio['mixed8/single']:.3f} (target >= 0.8); "
        f"set_adapter = {1000 * statistics.median(switches):.4f} ms (target < 1)"
    )
    report("inference", rows, key, {"args": vars(args), "rounds_s": t})


if __name__ == "__main__":
    main()
