"""d) Training memory: QLoRA (NF4 base) vs LoRA (fp32 base) on the SmolLM2-135M shape, each in a fresh process.

Reports the base model footprint and the process's peak RSS over load + a few training steps.
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
path, method, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
kw = {}
if method == "qlora":
    from smolpeft.qlora import bnb_config, prepare_for_kbit_training
    kw["quantization_config"] = bnb_config()
model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
if method == "qlora":
    prepare_for_kbit_training(model)
footprint = model.get_memory_footprint()
pm = smolpeft.get_peft_model(model, smolpeft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
pm.train()
loss_fn = TrainingLoss(pm)
opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, 49152, (2, 256), generator=torch.Generator().manual_seed(0))
t0 = time.perf_counter()
for _ in range(steps):
    loss_fn(input_ids=ids, labels=ids).backward(); opt.step(); opt.zero_grad(set_to_none=True)
print(json.dumps({"footprint_mb": footprint / 2**20, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "step_s": (time.perf_counter() - t0) / steps}))
"""


def main():
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    d = tempfile.mkdtemp()
    smollm2(args.layers).save_pretrained(d)
    results = {}
    for method in ("lora", "qlora"):
        out = subprocess.run([sys.executable, "-c", CHILD, d, method, str(args.steps), str(args.threads)],
                             capture_output=True, text=True, check=True, env=os.environ | {"TRANSFORMERS_VERBOSITY": "error"})
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = [{"method": m, **r} for m, r in results.items()]
    key = (f"QLoRA/LoRA: base footprint {results['qlora']['footprint_mb'] / results['lora']['footprint_mb']:.3f} "
           f"(target <= 0.35 at 30 layers), training peak RSS {results['qlora']['peak_rss_mb'] / results['lora']['peak_rss_mb']:.3f}")
    report("memory", rows, key, {"args": vars(args)})


if __name__ == "__main__":
    main()
