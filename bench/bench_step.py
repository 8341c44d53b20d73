"""a) One LoRA training step (r=16, all linear layers, batch 4x256) on the SmolLM2-135M shape: smolpeft vs peft.

Each contender runs forward + backward + AdamW step on the adapter. The no-grad forward of the same batch is
timed too: a LoRA step cannot cost much less than 2x that (backward through frozen weights is about one forward).
"""

import json
import subprocess
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import PeakRSS, alternate, median, parser, report, smollm2  # noqa: E402


def main():
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mem", choices=["smolpeft", "peft"], help="internal: measure one contender's step memory")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import peft

    import smolpeft
    from smolpeft.loss import TrainingLoss

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=g)
    kw = dict(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    ours = smolpeft.get_peft_model(smollm2(args.layers), smolpeft.LoraConfig(**kw))
    theirs = peft.get_peft_model(smollm2(args.layers), peft.LoraConfig(**kw))
    ours_loss = TrainingLoss(ours)
    opts = {
        n: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)
        for n, m in (("ours", ours), ("peft", theirs))
    }
    ours.train(), theirs.train()

    def step_ours():
        ours_loss(input_ids=ids, labels=ids).backward()
        opts["ours"].step(), opts["ours"].zero_grad(set_to_none=True)

    def step_peft():
        theirs(input_ids=ids, labels=ids).loss.backward()
        opts["peft"].step(), opts["peft"].zero_grad(set_to_none=True)

    def forward():
        with torch.no_grad():
            ours(input_ids=ids)

    if args.mem:  # a fresh process: the allocator holds no memory from the other contender's steps
        with PeakRSS() as m:
            {"smolpeft": step_ours, "peft": step_peft}[args.mem]()
        print(json.dumps({"peak_step_mem_mb": m.delta}))
        return
    t = alternate({"smolpeft": step_ours, "peft": step_peft, "forward": forward}, args.rounds)
    mem = {}
    for name in ("smolpeft", "peft"):
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--mem", name], capture_output=True, text=True, check=True
        )
        mem[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_step_mem_mb"]
    med = {k: median(v) for k, v in t.items()}
    rows = [
        {"contender": "smolpeft", "step_s": med["smolpeft"], "peak_step_mem_mb": mem["smolpeft"]},
        {"contender": "peft", "step_s": med["peft"], "peak_step_mem_mb": mem["peft"]},
        {"contender": "2x no-grad forward (floor)", "step_s": 2 * med["forward"], "peak_step_mem_mb": float("nan")},
    ]
    key = (
        f"step time smolpeft/peft = {med['smolpeft'] / med['peft']:.3f} (target <= 0.90); "
        f"smolpeft/floor = {med['smolpeft'] / (2 * med['forward']):.3f} (target <= 1.10); "
        f"peak step memory smolpeft/peft = {mem['smolpeft'] / mem['peft']:.3f} (target <= 0.90)"
    )
    report("adapter_step", rows, key, {"args": vars(args), "times_s": t})


if __name__ == "__main__":
    main()
