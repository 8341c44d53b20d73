"""d) Training memory: QLoRA (NF4 base) vs LoRA (fp32 base) on the SmolLM2-135M shape, each in a fresh process.

Reports the base model footprint, the peak RSS of the training steps (sampled every millisecond) and the process's
peak including loading (where QLoRA reads the fp32 checkpoint before quantizing it), with and without gradient
checkpointing (the same setting for both methods in each pair).
"""

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import parser, report, smollm2  # noqa: E402

CHILD = r"""
import json, resource, sys, time, torch
import transformers, smolpeft
from smolpeft.loss import TrainingLoss
path, method, steps, threads, ckpt = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
torch.set_num_threads(threads)
kw = {}
if method == "qlora":
    from smolpeft.qlora import bnb_config, prepare_model_for_kbit_training
    kw["quantization_config"] = bnb_config()
model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
if method == "qlora":
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
if ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
footprint = model.get_memory_footprint()
pm = smolpeft.get_peft_model(model, smolpeft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
pm.train()
loss_fn = TrainingLoss(pm)
opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, 49152, (2, 256), generator=torch.Generator().manual_seed(0))
import gc; gc.collect()
sys.path.insert(0, sys.argv[6])
from _common import PeakRSS, rss_mb
loaded = rss_mb()
t0 = time.perf_counter()
with PeakRSS() as train_peak:  # sampled every ms: the training phase alone, apart from loading
    for _ in range(steps):
        loss_fn(input_ids=ids, labels=ids).backward(); opt.step(); opt.zero_grad(set_to_none=True)
print(json.dumps({"footprint_mb": footprint / 2**20, "rss_after_load_mb": loaded, "train_peak_rss_mb": train_peak.peak,
                  "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "step_s": (time.perf_counter() - t0) / steps}))
"""


def main():
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    d = tempfile.mkdtemp()
    smollm2(args.layers).save_pretrained(d)
    results = {}
    for ckpt in (0, 1):
        for method in ("lora", "qlora"):
            cmd = [
                sys.executable,
                "-c",
                CHILD,
                d,
                method,
                str(args.steps),
                str(args.threads),
                str(ckpt),
                os.path.dirname(os.path.abspath(__file__)),
            ]
            out = subprocess.run(
                cmd, capture_output=True, text=True, check=True, env=os.environ | {"TRANSFORMERS_VERBOSITY": "error"}
            )
            results[method, ckpt] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = [{"method": m, "gradient_checkpointing": bool(c), **r} for (m, c), r in results.items()]
    ratio = {
        (c, k): results["qlora", c][k] / results["lora", c][k]
        for c in (0, 1)
        for k in ("train_peak_rss_mb", "process_peak_rss_mb")
    }
    key = (
        f"QLoRA/LoRA: base footprint {results['qlora', 0]['footprint_mb'] / results['lora', 0]['footprint_mb']:.3f} "
        f"(target <= 0.35 at 30 layers); training peak RSS {ratio[0, 'train_peak_rss_mb']:.3f} without and "
        f"{ratio[1, 'train_peak_rss_mb']:.3f} with gradient checkpointing (target < 1); process peak, loading "
        f"included, {ratio[0, 'process_peak_rss_mb']:.3f} and {ratio[1, 'process_peak_rss_mb']:.3f}"
    )
    report("memory", rows, key, {"args": vars(args)})


if __name__ == "__main__":
    main()
