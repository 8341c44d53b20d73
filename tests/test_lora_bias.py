"""LoRA biases against peft (the oracle): lora_bias=True (a trained bias on lora_B, merged into the base bias) and
bias="all" / "lora_only" (base biases that train and are saved with the adapter), same parameters, files and outputs."""

import peft
import pytest
import tiny
import torch

import smolpeft

GPT2 = dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM")


def _nodrop(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def _trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("init", [True, False])
def test_lora_bias_matches_peft(init, tmp_path):
    kw = dict(GPT2, lora_bias=True, init_lora_weights=init)
    models = []
    for lib in (smolpeft, peft):
        torch.manual_seed(0)
        models.append(lib.get_peft_model(_nodrop(tiny.gpt2()), lib.LoraConfig(**kw)))
    ours, theirs = models
    a, b = smolpeft.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert a.keys() == b.keys() and any(k.endswith("lora_B.bias") for k in a)
    for k in a:  # the same seeded draws, lora_B's bias included (zero unless init=False)
        assert torch.equal(a[k], b[k]), k
    assert _trainable(ours) == _trainable(theirs)
    tiny.perturb(ours), tiny.perturb(theirs)
    x = tiny.ids()
    ref = _logits(theirs, x)
    torch.testing.assert_close(_logits(ours, x), ref, atol=1e-5, rtol=0)
    for m in (ours, theirs):
        m(input_ids=x, labels=x).loss.backward()
    go, gt = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for n in _trainable(theirs):
        torch.testing.assert_close(go[n].grad, gt[n].grad, atol=1e-5, rtol=1e-4, msg=n)

    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_nodrop(tiny.gpt2()), tmp_path / "ours")
    torch.testing.assert_close(_logits(back, x), ref, atol=1e-5, rtol=0)
    tiny.assert_resaves_identically(back, tmp_path / "ours", tmp_path / "resaved")
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = smolpeft.PeftModel.from_pretrained(_nodrop(tiny.gpt2()), tmp_path / "theirs")
    torch.testing.assert_close(_logits(loaded, x), ref, atol=1e-5, rtol=0)

    # merging moves s·b_B into the base bias, and back
    bias = ours.base_model.model.transformer.h[0].attn.c_attn.base_layer.bias.clone()
    ours.merge_adapter()
    torch.testing.assert_close(_logits(ours, x), ref, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(
        ours.base_model.model.transformer.h[0].attn.c_attn.base_layer.bias, bias, atol=1e-6, rtol=0
    )
    torch.testing.assert_close(_logits(ours.merge_and_unload(), x), ref, atol=1e-5, rtol=0)


def test_lora_bias_refusals():
    with pytest.raises(ValueError, match="init_lora_weights True or False"):
        smolpeft.LoraConfig(lora_bias=True, init_lora_weights="gaussian")
    with pytest.raises(ValueError, match="Embedding"):
        smolpeft.get_peft_model(tiny.llama(), smolpeft.LoraConfig(target_modules=["embed_tokens"], lora_bias=True))
    with pytest.warns(UserWarning, match="cannot be merged"):  # Llama's projections have no bias
        model = smolpeft.get_peft_model(tiny.llama(), smolpeft.LoraConfig(target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="bias='some'"):
        smolpeft.LoraConfig(bias="some")


CASES = {
    "gpt2-all": (lambda: _nodrop(tiny.gpt2()), dict(GPT2, bias="all")),
    "gpt2-lora_only": (lambda: _nodrop(tiny.gpt2()), dict(GPT2, bias="lora_only")),
    "bert-cls-all": (tiny.bert_cls, dict(r=4, target_modules=["query", "value"], bias="all", task_type="SEQ_CLS")),
}


@pytest.mark.parametrize("case", CASES)
def test_trained_base_biases_match_peft(case, tmp_path):
    make, kw = CASES[case]
    ours = smolpeft.get_peft_model(make(), smolpeft.LoraConfig(**kw))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    assert _trainable(ours) == _trainable(theirs)
    assert any("bias" in n and "lora_" not in n for n in _trainable(ours))
    tiny.perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    x = tiny.ids()
    ref = _logits(ours, x)
    torch.testing.assert_close(_logits(theirs, x), ref, atol=1e-5, rtol=0)  # the biases came along
    tiny.assert_resaves_identically(theirs, tmp_path / "ours", tmp_path / "resaved")
    loaded = smolpeft.PeftModel.from_pretrained(make(), tmp_path / "resaved")
    torch.testing.assert_close(_logits(loaded, x), ref, atol=1e-5, rtol=0)
