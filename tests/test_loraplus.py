"""LoRA+ against peft (the oracle): the same parameter groups, learning rates and weight decays."""

import peft
import peft.optimizers
import pytest
import tiny
import torch

import smolpeft
import smolpeft.optimizers

CASES = {
    "llama-embedding-dora-head": (
        tiny.llama,
        dict(
            r=4,
            target_modules=["q_proj", "v_proj", "embed_tokens"],
            use_dora=True,
            modules_to_save=["lm_head"],
            task_type="CAUSAL_LM",
        ),
    ),
    "bert-cls-bias-all": (tiny.bert_cls, dict(r=4, target_modules=["query", "value"], bias="all", task_type="SEQ_CLS")),
    "gpt2-lora-bias": (
        tiny.gpt2,
        dict(r=4, target_modules=["c_attn"], lora_bias=True, fan_in_fan_out=True, task_type="CAUSAL_LM"),
    ),
}


def _groups(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        ({k: v for k, v in g.items() if k != "params"}, [names[id(p)] for p in g["params"]]) for g in opt.param_groups
    ]


@pytest.mark.parametrize("case", CASES)
def test_loraplus_groups_match_peft(case):
    make, kw = CASES[case]
    ours = smolpeft.get_peft_model(make(), smolpeft.LoraConfig(**kw))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    args = dict(lr=2e-4, loraplus_lr_ratio=16, loraplus_weight_decay=0.1, weight_decay=0.5, betas=(0.8, 0.9))
    a = smolpeft.create_loraplus_optimizer(ours, torch.optim.AdamW, **args)
    b = peft.optimizers.create_loraplus_optimizer(theirs, torch.optim.AdamW, **args)
    assert _groups(ours, a) == _groups(theirs, b)
    assert all(g["params"] for g in a.param_groups[::2])  # A and B groups are not empty
    assert smolpeft.optimizers.create_loraplus_optimizer is smolpeft.create_loraplus_optimizer
    # embedding factors get their own (small) rate
    emb = smolpeft.create_loraplus_optimizer(
        ours, torch.optim.SGD, lr=1e-3, loraplus_lr_ratio=4, loraplus_lr_embedding=1e-5
    )
    assert [g["lr"] for g in emb.param_groups] == pytest.approx([1e-3, 1e-5, 4e-3, 4e-3])
