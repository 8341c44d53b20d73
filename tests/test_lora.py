"""LoRA layer math and injection, against plain matmuls and peft."""

import pytest
import tiny
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from smolpeft import LoraConfig, get_peft_model
from smolpeft.lora import AdapterState, LoraLayer, resolve_targets


def _layer(base, r=4, alpha=8, rslora=False, init=False):
    layer = LoraLayer(base, AdapterState())
    layer.add("default", r, alpha, 0.0, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=init))
    return layer


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_forward_is_base_plus_scaled_low_rank(rslora):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = _layer(base, rslora=rslora)
    x = torch.randn(5, 16)
    s = 8 / (4**0.5 if rslora else 4)
    A, B = layer.factors("default")
    torch.testing.assert_close(layer(x), base(x) + s * x @ A.T @ B.T, atol=1e-6, rtol=0)


def test_conv1d_and_embedding_use_transposed_weights():
    torch.manual_seed(0)
    conv = Conv1D(12, 16)  # GPT-2 style: weight is in×out
    layer = _layer(conv)
    x = torch.randn(2, 3, 16)
    merged = x @ (conv.weight + layer.get_delta_weight("default")) + conv.bias
    torch.testing.assert_close(layer(x), merged, atol=1e-5, rtol=0)

    emb = nn.Embedding(20, 8)
    layer = _layer(emb)
    ids = torch.randint(0, 20, (2, 5))
    torch.testing.assert_close(layer(ids), nn.functional.embedding(ids, emb.weight + layer.get_delta_weight("default")))


def test_default_init_leaves_outputs_unchanged():
    torch.manual_seed(0)
    for base, x in [(nn.Linear(16, 12), torch.randn(4, 16)), (nn.Embedding(20, 8), torch.randint(0, 20, (3, 4)))]:
        layer = _layer(base, init=True)
        assert torch.equal(layer(x), base(x))
        zero = layer.factors("default")[0 if isinstance(base, nn.Embedding) else 1]
        assert torch.count_nonzero(zero) == 0


def test_merge_is_idempotent_and_unmerge_restores():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    w0 = base.weight.detach().clone()
    layer = _layer(base)
    x = torch.randn(4, 16)
    y = layer(x)
    layer.merge("default")
    layer.merge("default")  # second merge is a no-op
    torch.testing.assert_close(base.weight, w0 + layer.get_delta_weight("default"))
    torch.testing.assert_close(layer(x), y, atol=1e-6, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-7, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_inits_keep_the_function(init):
    model = tiny.llama()
    x = tiny.ids()
    ref = model(x).logits
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, init_lora_weights=init))
    torch.testing.assert_close(pm(input_ids=x).logits, ref, atol=1e-4, rtol=0)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lora_B["default"].weight) > 0  # not a zero adapter: it carries W's top directions


def test_target_resolution_rules():
    m = tiny.llama()
    assert resolve_targets(m, LoraConfig(target_modules=["q_proj"])) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert resolve_targets(m, LoraConfig(target_modules=r".*\.1\.mlp\.(up|down)_proj")) == [
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert resolve_targets(m, LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=1)) == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert len(resolve_targets(m, LoraConfig(target_modules=None))) == 4  # llama default: q_proj, v_proj
    linear = resolve_targets(m, LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in linear and len(linear) == 14
    assert resolve_targets(m, LoraConfig(target_modules="all-linear", exclude_modules=["mlp.up_proj", "k_proj"])) == [
        n for n in linear if not n.endswith(("up_proj", "k_proj"))
    ]
    assert resolve_targets(tiny.gpt2(), LoraConfig()) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_rank_and_alpha_patterns():
    pm = get_peft_model(
        tiny.llama(),
        LoraConfig(r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2}),
    )
    attn0, attn1 = pm.base_model.model.model.layers[0].self_attn, pm.base_model.model.model.layers[1].self_attn
    assert attn0.v_proj.r["default"] == 2 and attn0.q_proj.r["default"] == 4
    assert attn1.q_proj.scaling["default"] == 0.5 and attn0.q_proj.scaling["default"] == 2


def test_bad_targets_and_hyperparameters():
    with pytest.raises(ValueError, match=r"matched no module of LlamaForCausalLM.*q_proj"):
        get_peft_model(tiny.llama(), LoraConfig(target_modules=["qkv"]))
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        LoraConfig(lora_dropout=1.0)
    with pytest.raises(TypeError, match="LlamaRMSNorm"):
        get_peft_model(tiny.llama(), LoraConfig(target_modules=["input_layernorm"]))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_init_adapters_round_trip_like_peft(init, tmp_path):
    """The file holds A, B trained over the residual; loading redoes the decomposition of the original base."""
    import peft

    pm = get_peft_model(tiny.llama(), LoraConfig(r=4, lora_alpha=4, init_lora_weights=init))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.05)
    x = tiny.ids()
    with torch.no_grad():
        trained = pm(input_ids=x).logits
    pm.save_pretrained(tmp_path)
    from smolpeft import PeftModel

    for lib in (PeftModel, peft.PeftModel):
        loaded = lib.from_pretrained(tiny.llama(), tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=x).logits, trained, atol=1e-4, rtol=0)
