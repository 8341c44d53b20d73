"""CorDA against real peft: the same data gives the same decomposition, factors, residual base and outputs."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import tiny
import torch
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess
from torch import nn

import smolpeft
from smolpeft.tuners.lora.config import CordaConfig
from smolpeft.tuners.lora.corda import preprocess_corda


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(40, 30)
        self.out = nn.Linear(30, 20)

    def forward(self, x):
        return self.out(torch.relu(self.lin(x)))


@pytest.fixture
def base_and_data():
    torch.manual_seed(0)
    return Mlp(), torch.rand(64, 40)


def _corda_model(lib, base, data, method, **kw):
    pre, cc = (preprocess_corda, CordaConfig) if lib is smolpeft else (peft_preprocess, PeftCordaConfig)
    model = copy.deepcopy(base)
    cfg = lib.LoraConfig(
        target_modules=["lin", "out"], init_lora_weights="corda", corda_config=cc(corda_method=method), **kw
    )
    pre(model, cfg, run_model=lambda: model(data))
    return model, cfg


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_equals_peft(base_and_data, method):
    base, data = base_and_data
    out = {}
    for lib in (smolpeft, peft):
        model, cfg = _corda_model(lib, base, data, method, r=4, rank_pattern={"out": 2}, lora_alpha=6)
        pm = lib.get_peft_model(model, cfg)
        out[lib] = ({n: p.detach().clone() for n, p in pm.named_parameters()}, pm(data).detach())
        assert not hasattr(pm.base_model.model.lin.base_layer, "eigens")  # used once, then dropped
    (ours, y1), (theirs, y2) = out[smolpeft], out[peft]
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0, msg=k)
    torch.testing.assert_close(y1, base(data).detach(), atol=1e-5, rtol=0)  # W_res + s·B₀A₀ = W
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=0)


def test_covariance_hooks_and_caches(base_and_data, tmp_path):
    base, data = base_and_data
    model = copy.deepcopy(base)
    cfg = smolpeft.LoraConfig(
        target_modules=["lin"],
        init_lora_weights="corda",
        corda_config=CordaConfig(
            prune_temporary_fields=False, cache_file=tmp_path / "c.pt", covariance_file=tmp_path / "cov.pt"
        ),
    )
    preprocess_corda(model, cfg, run_model=lambda: [model(data), model(data)])
    lin = model.lin
    assert lin.sample_count == 2 and not lin._forward_hooks  # the hooks are gone once the data has run
    x = data / data.max()
    torch.testing.assert_close(lin.covariance_matrix, x.T @ x, atol=1e-4, rtol=1e-5)
    expected = smolpeft.get_peft_model(model, cfg)
    for kw in (dict(cache_file=tmp_path / "c.pt"), dict(covariance_file=tmp_path / "cov.pt")):
        again = copy.deepcopy(base)
        cfg2 = smolpeft.LoraConfig(target_modules=["lin"], init_lora_weights="corda", corda_config=CordaConfig(**kw))
        preprocess_corda(again, cfg2)  # no data needed: everything comes from the cache
        pm = smolpeft.get_peft_model(again, cfg2)
        for n, p in expected.named_parameters():
            torch.testing.assert_close(dict(pm.named_parameters())[n], p, atol=1e-6, rtol=0)
    torch.save({"x": torch.zeros(1)}, tmp_path / "pickle.pt")  # PEFT's cache format: never unpickled
    cfg3 = smolpeft.LoraConfig(
        target_modules=["lin"], init_lora_weights="corda", corda_config=CordaConfig(cache_file=tmp_path / "pickle.pt")
    )
    with pytest.raises(ValueError, match="not a safetensors file"):
        preprocess_corda(copy.deepcopy(base), cfg3)
    with pytest.raises(ValueError, match="please run `preprocess_corda` first"):
        smolpeft.get_peft_model(copy.deepcopy(base), cfg3)
    other = smolpeft.LoraConfig(
        target_modules=["out"], init_lora_weights="corda", corda_config=CordaConfig(cache_file=tmp_path / "c.pt")
    )
    with pytest.raises(ValueError, match="has no entry 'out.eigens.S_WC'"):  # a cache built for other layers
        preprocess_corda(copy.deepcopy(base), other)


def test_corda_adapter_loads_and_converts(base_and_data, tmp_path):
    """Loading onto a model with the same decomposition gives the trained outputs over the untouched base; the
    converted plain-LoRA file (rank 2r) loads in peft over the original base to the same outputs."""
    base, data = base_and_data
    model, cfg = _corda_model(smolpeft, base, data, "ipm", r=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = smolpeft.get_peft_model(copy.deepcopy(model), cfg)
    pm.save_pretrained(tmp_path / "init")
    with torch.no_grad():
        pm.base_model.model.lin.lora_B["default"].weight.mul_(2)
        trained = pm(data)
    pm.save_pretrained(tmp_path / "trained")
    pm.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    loaded = smolpeft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "trained")
    torch.testing.assert_close(loaded(data), trained, atol=1e-5, rtol=0)
    assert torch.equal(loaded.base_model.model.lin.base_layer.weight, base.lin.weight)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "plain")
    assert ref.peft_config["default"].r == 8
    torch.testing.assert_close(ref(data), trained, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="please run `preprocess_corda` first"):
        smolpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "trained")  # no decomposition to undo


def test_corda_on_gpt2_conv1d_equals_peft():
    """GPT-2's Conv1D stores Wᵀ: the decomposition and the residual are taken in LoRA's out×in view, as in PEFT."""
    model, x = tiny.gpt2(), tiny.ids()[:1]  # PEFT's hook takes one row at a time
    out = {}
    for lib, pre, cc in ((smolpeft, preprocess_corda, CordaConfig), (peft, peft_preprocess, PeftCordaConfig)):
        m = copy.deepcopy(model)
        cfg = lib.LoraConfig(
            r=4, target_modules=["c_attn", "c_fc"], init_lora_weights="corda", corda_config=cc(corda_method="kpm")
        )
        pre(m, cfg, run_model=lambda m=m: m(input_ids=x))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = lib.get_peft_model(m, cfg)
        with torch.no_grad():
            out[lib] = ({n: p.detach().clone() for n, p in pm.named_parameters()}, pm(input_ids=x).logits)
    (ours, y1), (theirs, y2) = out[smolpeft], out[peft]
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0, msg=k)
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=0)
    torch.testing.assert_close(y1, model(input_ids=x).logits, atol=1e-5, rtol=0)
