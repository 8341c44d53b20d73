"""Hot-swapping against peft (the oracle): the same model after a swap, in place (a compiled model does not recompile),
with PEFT's padding, scalings and errors."""

import re

import peft
import peft.utils.hotswap as peft_hotswap
import pytest
import tiny
import torch

import smolpeft
import smolpeft.utils.hotswap as our_hotswap

LIBS = [(smolpeft, our_hotswap), (peft, peft_hotswap)]


def _save(tmp_path, name, seed, **kwargs):
    """An adapter with non-trivial weights, saved by peft (so both libraries load the same file)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(tiny.llama(), peft.LoraConfig(init_lora_weights=False, **kwargs))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def _logits(model):
    with torch.no_grad():
        return model(input_ids=tiny.ids()).logits


@pytest.fixture
def adapters(tmp_path):
    a0 = _save(tmp_path, "a0", 0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    a1 = _save(tmp_path, "a1", 1, r=6, lora_alpha=3, target_modules=["q_proj", "o_proj"])
    a2 = _save(tmp_path, "a2", 2, r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "o_proj"])
    return a0, a1, a2


def test_hotswap_gives_the_swapped_in_adapter_as_peft(adapters):
    """A swap to a larger rank on fewer layers, then to a smaller rank: each time the model is the one that loads
    the new adapter directly, and the state dict is peft's after the same swaps."""
    a0, a1, a2 = adapters
    want = {a: _logits(smolpeft.PeftModel.from_pretrained(tiny.llama(), a)) for a in (a1, a2)}
    models = []
    for lib, hs in LIBS:
        model = lib.PeftModel.from_pretrained(tiny.llama(), a0)
        hs.prepare_model_for_compiled_hotswap(model, target_rank=6)
        params = {k: p for k, p in model.named_parameters()}
        for a in (a1, a2):
            hs.hotswap_adapter(model, a, adapter_name="default")
            torch.testing.assert_close(_logits(model), want[a], atol=1e-5, rtol=1e-5)
        assert all(p is params[k] for k, p in model.named_parameters())  # in place: same tensors
        models.append(model)
    ours, theirs = (m.state_dict() for m in models)
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], msg=k)


def test_prepare_pads_as_peft_without_changing_outputs(adapters):
    a0, _, _ = adapters
    out = []
    for lib, hs in LIBS:
        model = lib.PeftModel.from_pretrained(tiny.llama(), a0)
        before = _logits(model)
        hs.prepare_model_for_compiled_hotswap(model, target_rank=9, config=model.peft_config)
        torch.testing.assert_close(_logits(model), before)
        assert model.peft_config["default"].r == 9
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert isinstance(layer.scaling["default"], torch.Tensor)
        out.append({k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert out[0] == out[1]


def test_compiled_model_does_not_recompile(adapters):
    """prepare -> compile -> swap in a different rank and alpha: same graph, new adapter's outputs."""
    a0, a1, a2 = adapters
    want = _logits(smolpeft.PeftModel.from_pretrained(tiny.llama(), a2))
    model = smolpeft.PeftModel.from_pretrained(tiny.llama(), a0)
    our_hotswap.prepare_model_for_compiled_hotswap(model, target_rank=6)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    x = tiny.ids()
    with torch.no_grad():
        compiled(input_ids=x)
        our_hotswap.hotswap_adapter(compiled, a2, adapter_name="default")
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = compiled(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_errors_as_peft(adapters, tmp_path):
    a0, a1, _ = adapters
    other_alpha = _save(tmp_path, "pat", 3, r=4, target_modules=["q_proj"], alpha_pattern={"q_proj": 2})
    for lib, hs in LIBS:
        model = lib.PeftModel.from_pretrained(tiny.llama(), a1)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        # a0 targets v_proj, which the loaded adapter lacks: nothing may change
        with pytest.raises(RuntimeError, match="Hot swapping the adapter did not succeed, unexpected keys found"):
            hs.hotswap_adapter(model, a0, adapter_name="default")
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        with pytest.raises(ValueError, match=re.escape("Configs are incompatible: for alpha_pattern")):
            hs.hotswap_adapter(model, other_alpha, adapter_name="default")
        model.merge_adapter()
        with pytest.raises(ValueError, match="currently merged into the base weights"):
            hs.hotswap_adapter(model, a1, adapter_name="default")
        with pytest.raises(ValueError, match=re.escape("original rank is larger (6)")):
            hs.prepare_model_for_compiled_hotswap(model, target_rank=5)
    with pytest.raises(ValueError, match="No adapter layers found on the model"):
        our_hotswap.prepare_model_for_compiled_hotswap(tiny.llama())
