"""e) The course's stack on smolpeft, against the same stack on peft.

step: one LoRA training step through the model's own forward, `model(input_ids=..., labels=...).loss.backward()`
      + AdamW (r=16, all linear layers, batch 2x256, SmolLM2-135M shape): smolpeft's PeftModel.forward takes the
      lean loss; peft's goes through transformers' loss over full fp32 logits. Times alternate in one process
      (medians); peak step memory is measured in a fresh process per contender.
sft:  the same SFT job (bench_sft's data and settings: packing, gradient checkpointing, max length 512, fp32) through
      smolpeft.trl.SFTTrainer + smolpeft.LoraConfig and through trl.SFTTrainer + peft.LoraConfig; each job in a
      fresh process, alternating, medians of tokens/s and peak RSS.
"""

import json
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import PeakRSS, alternate, median, parser, report, smollm2  # noqa: E402
from bench_sft import TRL_CHILD, build, run_jobs  # noqa: E402

# The same script with only the imports changed, as a course user would change them.
OURS_CHILD = TRL_CHILD.replace("from peft import LoraConfig", "from smolpeft import LoraConfig").replace(
    "from trl import SFTConfig, SFTTrainer", "from trl import SFTConfig\nfrom smolpeft.trl import SFTTrainer"
)


def step(args) -> None:
    import peft

    import smolpeft

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=g)
    kw = dict(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    models = {}
    if args.mem in (None, "smolpeft"):
        models["smolpeft"] = smolpeft.get_peft_model(smollm2(args.layers), smolpeft.LoraConfig(**kw))
    if args.mem in (None, "peft"):
        models["peft"] = peft.get_peft_model(smollm2(args.layers), peft.LoraConfig(**kw))
    steps = {}
    for name, m in models.items():
        m.train()
        opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)

        def one(m=m, opt=opt):
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step(), opt.zero_grad(set_to_none=True)

        steps[name] = one
    if args.mem:  # a fresh process: the allocator holds no memory from the other contender's steps
        with PeakRSS() as rss:
            steps[args.mem]()
        print(json.dumps({"peak_step_mem_mb": rss.delta, "exact": rss.exact}))
        return
    t = alternate(steps, args.rounds)
    # A step's peak RSS varies between identical fresh processes (glibc's heap reuse depends on the order frees happen
    # in), so memory is the median over --mem-rounds fresh processes per contender, alternating.
    mem: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.mem_rounds):
        for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--mem", name]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
            mem[name].append(json.loads(out)["peak_step_mem_mb"])
    med = {k: median(v) for k, v in t.items()}
    peak = {k: median(v) for k, v in mem.items()}
    rows = [{"contender": k, "step_s": med[k], "peak_step_mem_mb": peak[k]} for k in steps]
    key = (
        f"model(input_ids, labels) step, {args.layers} layers: time smolpeft/peft = "
        f"{med['smolpeft'] / med['peft']:.3f} (target <= 0.85); peak memory smolpeft/peft = "
        f"{peak['smolpeft'] / peak['peft']:.3f} (target <= 0.70)"
    )
    report("forward_labels_step", rows, key, {"args": vars(args), "times_s": t, "peak_mb": mem})


def sft(args) -> None:
    root = tempfile.mkdtemp()
    model_dir, data = build(args.layers, root, args.rows)
    runs = run_jobs({"smolpeft.trl": OURS_CHILD, "trl+peft": TRL_CHILD}, model_dir, data, root, args)
    results = {name: {k: median([x[k] for x in rs]) for k in rs[0]} for name, rs in runs.items()}
    ours, trl = results["smolpeft.trl"], results["trl+peft"]
    key = (
        f"SFT job, {args.layers} layers: tokens/s smolpeft.trl/TRL+peft = "
        f"{ours['loop_tokens_per_s'] / trl['loop_tokens_per_s']:.3f} (training loop; whole job "
        f"{ours['job_tokens_per_s'] / trl['job_tokens_per_s']:.3f})"
        f" (target >= 1.0); peak RSS = {ours['peak_rss_mb'] / trl['peak_rss_mb']:.3f} (target <= 0.8)"
    )
    report("trl_sft_job", [{"job": k, **v} for k, v in results.items()], key, {"args": vars(args), "runs": runs})


def main():
    p = parser(__doc__)
    p.add_argument("what", choices=["step", "sft"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=0, help="sft: 0 is one epoch")
    p.add_argument("--rows", type=int, default=48, help="sft: chat rows trained on (0: all 378)")
    p.add_argument("--mem-rounds", type=int, default=5, help="fresh processes per contender for peak memory")
    p.add_argument("--mem", choices=["smolpeft", "peft"], help="internal: measure one contender's step memory")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    step(args) if args.what == "step" else sft(args)


if __name__ == "__main__":
    main()
