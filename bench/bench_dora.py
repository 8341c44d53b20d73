"""e) DoRA (r=16, all linear layers, batch 4x256) on the SmolLM2-135M shape: a training step against peft's DoRA and
our own LoRA, and no-grad inference unmerged and merged against the base model.

peft recomputes ||W + s·B A|| from the full out×in product on every forward; smolpeft computes it from ||W||²
(cached: W is frozen), W Aᵀ and A Aᵀ (rank-r products), once per optimizer step, and rescales the LoRA output in place
at inference. paired_ratio: the median over rounds of each case's time over smolpeft DoRA's (steps) or the base's
(forwards) in the same round.
"""

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import alternate, median, parser, report, smollm2  # noqa: E402


def _perturb(model, seed=5):
    """Non-trivial B and m, alike in both libraries (names are the same), so the rescaling is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)


def main():
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--infer-batch", type=int, default=4)
    p.add_argument("--infer-rounds", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import peft

    import smolpeft
    from smolpeft.loss import TrainingLoss

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=g)
    kw = dict(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    dora = smolpeft.get_peft_model(smollm2(args.layers), smolpeft.LoraConfig(use_dora=True, **kw))
    theirs = peft.get_peft_model(smollm2(args.layers), peft.LoraConfig(use_dora=True, **kw))
    lora = smolpeft.get_peft_model(smollm2(args.layers), smolpeft.LoraConfig(**kw))
    for m in (dora, theirs, lora):
        _perturb(m)
    with torch.no_grad():  # the same function, before timing anything
        diff = (dora(input_ids=ids[:1, :64]).logits - theirs(input_ids=ids[:1, :64]).logits).abs().max().item()
    assert diff < 1e-4, diff
    models = {"smolpeft DoRA": dora, "peft DoRA": theirs, "smolpeft LoRA": lora}
    losses = {"smolpeft DoRA": TrainingLoss(dora), "smolpeft LoRA": TrainingLoss(lora)}
    opts = {n: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4) for n, m in models.items()}
    for m in models.values():
        m.train()

    def step(name):
        def run():
            if name in losses:
                losses[name](input_ids=ids, labels=ids).backward()
            else:
                models[name](input_ids=ids, labels=ids).loss.backward()
            opts[name].step(), opts[name].zero_grad(set_to_none=True)

        return run

    steps = alternate({n: step(n) for n in models}, args.rounds) if args.rounds else None  # --rounds 0: inference only
    del theirs
    for d in (models, opts, losses):  # free peft's model and the optimizer states before timing inference
        d.clear()

    # inference: the trained DoRA model unmerged, the same merged (merge_and_unload: a plain transformers model), our
    # LoRA unmerged for reference, and the base model
    dora.eval(), lora.eval()
    merged = smolpeft.get_peft_model(smollm2(args.layers), smolpeft.LoraConfig(use_dora=True, **kw))
    merged.load_state_dict(dora.state_dict())
    merged = merged.merge_and_unload().eval()
    base = smollm2(args.layers)
    x = ids[: args.infer_batch]

    def fwd(m):
        def run():
            with torch.no_grad():
                m(input_ids=x)

        return run

    infer = alternate(
        {"base": fwd(base), "DoRA unmerged": fwd(dora), "DoRA merged": fwd(merged), "LoRA unmerged": fwd(lora)},
        args.infer_rounds,
    )
    i = {k: median(v) for k, v in infer.items()}

    def paired(a, b, t):  # median of per-round ratios: each round's contenders ran back to back
        return median([x / y for x, y in zip(t[a], t[b])])

    rows, key = [], ""
    if steps:
        s = {k: median(v) for k, v in steps.items()}
        rows = [
            {"case": f"train step, {k}", "median_s": v, "paired_ratio": paired(k, "smolpeft DoRA", steps)}
            for k, v in s.items()
        ]
        key = (
            f"DoRA step smolpeft/peft = {paired('smolpeft DoRA', 'peft DoRA', steps):.3f} (target <= 0.70); "
            f"smolpeft DoRA/LoRA step = {paired('smolpeft DoRA', 'smolpeft LoRA', steps):.3f} (target <= 1.30); "
        )
    rows += [
        {"case": f"no-grad forward, {k}", "median_s": v, "paired_ratio": paired(k, "base", infer)} for k, v in i.items()
    ]
    key += (
        f"inference unmerged/base = {paired('DoRA unmerged', 'base', infer):.3f} (target <= 1.15); merged/base = "
        f"{paired('DoRA merged', 'base', infer):.3f} (target 1.00) [medians of per-round ratios]"
    )
    report("dora", rows, key, {"args": vars(args), "steps_s": steps, "inference_s": infer})


if __name__ == "__main__":
    main()
