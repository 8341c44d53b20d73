"""LoRA initializations against real peft: same seed -> the same factors, base weights, trainable set and outputs."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import tiny
import torch
from torch import nn

import smolpeft


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(20, 30)
        self.emb = nn.Embedding(15, 12)
        self.out = nn.Linear(30, 10)

    def forward(self, x):
        return self.out(torch.relu(self.lin(x)))


def _build(lib, base: nn.Module, seed: int = 1, **kw):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**kw))


def _tensors(pm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pm.named_parameters()}


def _trainable(pm) -> list[str]:
    return sorted(n for n, p in pm.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "init, targets",
    [
        ("mica", ["lin", "emb", "out"]),
        ("orthogonal", ["lin", "out"]),
        ("pissa_niter_4", ["lin", "out"]),
        ("OLoRA", ["lin"]),
        ("eva", ["lin"]),
    ],
)
def test_init_equals_peft(init, targets):
    """Every tensor (factors and the possibly rewritten base) and the trainable set equal peft's for the same seed."""
    torch.manual_seed(0)
    base = Mlp()
    ours = _build(smolpeft, base, r=4, target_modules=targets, init_lora_weights=init)
    theirs = _build(peft, base, r=4, target_modules=targets, init_lora_weights=init)
    a, b = _tensors(ours), _tensors(theirs)
    assert a.keys() == b.keys()
    for k in a:  # randomized SVD reorders float sums differently between runs of the same draw: 1e-6
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    assert _trainable(ours) == _trainable(theirs)
    x = torch.randn(3, 20)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_mica_is_identity_trains_only_A_and_keeps_B_frozen_across_switches():
    torch.manual_seed(0)
    base = Mlp()
    x = torch.randn(4, 20)
    pm = _build(smolpeft, base, r=4, target_modules=["lin"], init_lora_weights="mica")
    torch.testing.assert_close(pm(x), base(x), atol=1e-6, rtol=0)  # A = 0: the adapter starts as the identity
    layer = pm.base_model.model.lin
    B = layer.lora_B["default"].weight
    U = torch.linalg.svd(base.lin.weight.detach(), full_matrices=False)[0]  # 30×20: the 20 directions W has
    torch.testing.assert_close(B @ B.T, U[:, -4:] @ U[:, -4:].T, atol=1e-5, rtol=0)  # the minor subspace
    pm.add_adapter("other", smolpeft.LoraConfig(r=4, target_modules=["lin", "out"]))
    pm.set_adapter("other")
    pm.set_adapter("default")
    assert _trainable(pm) == ["base_model.model.lin.lora_A.default.weight"]
    pm.set_requires_grad("default", False)
    pm.set_requires_grad("default", True)  # as PEFT: B stays frozen
    assert _trainable(pm) == ["base_model.model.lin.lora_A.default.weight"]
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    B0 = B.detach().clone()
    pm(x).sum().backward()
    opt.step()
    assert torch.equal(B, B0) and layer.lora_A["default"].weight.abs().sum() > 0
    pm.delete_adapter("default")
    assert "default" not in layer.frozen_peft_weight_names


def test_mica_adapter_round_trips_through_peft(tmp_path):
    """Saved in PEFT's format (A and the frozen B): each library loads the other's file to the same outputs."""
    model = tiny.llama()
    x = tiny.ids()
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="mica")
    pm = smolpeft.get_peft_model(copy.deepcopy(model), smolpeft.LoraConfig(**cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n:
                p.add_(0.05)
        expected = pm(input_ids=x).logits
    pm.save_pretrained(tmp_path)
    for lib in (smolpeft, peft):
        loaded = lib.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=x).logits, expected, atol=1e-5, rtol=0)


def test_refusals_and_warnings_match_peft():
    with pytest.raises(ValueError, match="even") as ours:
        _build(smolpeft, Mlp(), r=3, target_modules=["lin"], init_lora_weights="orthogonal")
    with pytest.raises(ValueError) as theirs:
        _build(peft, Mlp(), r=3, target_modules=["lin"], init_lora_weights="orthogonal")
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="MiCA requires `r` <= min"):
        _build(smolpeft, Mlp(), r=11, target_modules=["out"], init_lora_weights="mica")
    for kw in (dict(rank_pattern={"lin": 2}), dict(alpha_pattern={"lin": 2})):
        with pytest.warns(UserWarning, match="Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern"):
            smolpeft.LoraConfig(init_lora_weights="pissa_niter_2", use_rslora=True, **kw)
    with pytest.warns(UserWarning, match="`eva_config` specified but will be ignored"):
        smolpeft.LoraConfig(eva_config=smolpeft.EvaConfig())
    with pytest.raises(ValueError, match="`tau` must be between 0.0 and 1.0."):
        smolpeft.EvaConfig(tau=2)
    with pytest.raises(ValueError, match="pissa_niter_x"):
        smolpeft.LoraConfig(init_lora_weights="pissa_niter_x")


@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_conversion_refuses_rslora_with_patterns(init, tmp_path):
    with pytest.warns(UserWarning, match="Rank-Stabilized"):
        cfg = smolpeft.LoraConfig(
            r=4, target_modules=["lin"], init_lora_weights=init, use_rslora=True, rank_pattern={"lin": 2}
        )
    pm = smolpeft.get_peft_model(Mlp(), cfg)
    pm.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="not supported when using `rank_pattern` or `alpha_pattern`"):
        pm.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=tmp_path / "init")


def test_olora_conversion_equals_peft(tmp_path):
    """The trained OLoRA adapter saved as plain LoRA (rank 2r) gives peft's file: same config, same tensors."""
    torch.manual_seed(0)
    base = Mlp()
    out = {}
    for lib in (smolpeft, peft):
        pm = _build(lib, base, r=4, target_modules=["lin"], init_lora_weights="olora", alpha_pattern={"lin": 6})
        d = tmp_path / lib.__name__
        pm.save_pretrained(d / "init")
        with torch.no_grad():
            pm.base_model.model.lin.lora_B["default"].weight.mul_(2)
        pm.save_pretrained(d / "conv", path_initial_model_for_weight_conversion=d / "init")
        out[lib.__name__] = (
            peft.LoraConfig.from_pretrained(d / "conv"),
            peft.utils.load_peft_weights(str(d / "conv")),
        )
    (c1, w1), (c2, w2) = out["smolpeft"], out["peft"]
    assert (c1.r, c1.lora_alpha, c1.alpha_pattern, c1.init_lora_weights) == (8, 16, {"lin": 12}, True)
    assert (c1.r, c1.lora_alpha, c1.alpha_pattern, c1.init_lora_weights) == (
        c2.r,
        c2.lora_alpha,
        c2.alpha_pattern,
        c2.init_lora_weights,
    )
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_adapter_with_another_warns_like_peft(init, tmp_path):
    """Where the base really is the residual (an adapter created with PiSSA/OLoRA here), loading another adapter warns
    with PEFT's message (adding one too, where PEFT is silent); a loaded PiSSA/OLoRA adapter is plain LoRA over the
    untouched base, so loading one next to others does not."""
    name = {"pissa": "PiSSA", "olora": "OLoRA"}[init]
    _build(smolpeft, Mlp(), r=2, target_modules=["out"]).save_pretrained(tmp_path / "plain")
    msgs = {}
    for lib in (smolpeft, peft):
        pm = _build(lib, Mlp(), r=4, target_modules=["lin"], init_lora_weights=init)
        pm.save_pretrained(tmp_path / lib.__name__)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            pm.load_adapter(tmp_path / "plain", adapter_name="other")
        msgs[lib] = [str(x.message) for x in w if "changes the base weights" in str(x.message)]
    assert msgs[smolpeft] == msgs[peft] and msgs[smolpeft][0].startswith(f"{name} changes the base weights")
    with pytest.warns(UserWarning, match=f"{name} changes the base weights"):
        pm = _build(smolpeft, Mlp(), r=4, target_modules=["lin"], init_lora_weights=init)
        pm.add_adapter("other", smolpeft.LoraConfig(r=2, target_modules=["out"]))
    plain = smolpeft.PeftModel.from_pretrained(Mlp(), tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.load_adapter(tmp_path / "smolpeft", adapter_name="loaded")


def test_pissa_niter_adapter_loads_with_a_warning_and_converts_exactly(tmp_path):
    """On load the randomized SVD is drawn again (as PEFT does), so smolpeft warns; the converted file is exact."""
    torch.manual_seed(0)
    base = Mlp()
    x = torch.randn(5, 20)
    pm = _build(smolpeft, base, r=4, target_modules=["lin"], init_lora_weights="pissa_niter_2")
    pm.save_pretrained(tmp_path / "init")
    with torch.no_grad():
        pm.base_model.model.lin.lora_A["default"].weight.mul_(1.5)
        trained = pm(x)
    pm.save_pretrained(tmp_path / "trained")
    pm.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    with pytest.warns(UserWarning, match="randomized SVD"):
        smolpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "trained")
    for lib in (smolpeft, peft):
        loaded = lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "plain")
        torch.testing.assert_close(loaded(x), trained, atol=1e-5, rtol=0)
