"""convert_to_lora against peft (the oracle): the same factors, config and keys, and a LoRA that reproduces ΔW."""

import warnings

import peft
import pytest
import tiny
import torch

import smolpeft


def _model(lib, make=tiny.llama, **kwargs):
    torch.manual_seed(0)
    kwargs = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False) | kwargs
    return lib.get_peft_model(make(), lib.LoraConfig(**kwargs))


@pytest.mark.parametrize(
    "make, kwargs, rank",
    [
        (tiny.llama, {}, 3),
        (tiny.llama, {}, 0.9),
        (tiny.gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True), 4),
    ],
    ids=["llama-int", "llama-energy", "gpt2-conv1d"],
)
def test_same_conversion_as_peft(make, kwargs, rank):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (c0, s0), (c1, s1) = (lib.convert_to_lora(_model(lib, make, **kwargs), rank) for lib in (smolpeft, peft))
    assert sorted(s0) == sorted(s1)
    for k in s0:
        torch.testing.assert_close(s0[k], s1[k], msg=k)
    assert sorted(c0.target_modules) == sorted(c1.target_modules)
    assert (c0.r, c0.lora_alpha, c0.rank_pattern, c0.alpha_pattern) == (
        c1.r,
        c1.lora_alpha,
        c1.rank_pattern,
        c1.alpha_pattern,
    )


def test_full_rank_conversion_reproduces_the_adapter(tmp_path):
    source = _model(smolpeft)
    x = tiny.ids()
    with torch.no_grad():
        want = source(input_ids=x).logits
    with pytest.warns(UserWarning, match="already a LoRA adapter"):
        smolpeft.save_as_lora(tmp_path / "lora", source, rank=8)
    loaded = smolpeft.PeftModel.from_pretrained(tiny.llama(), tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, want, atol=1e-5, rtol=1e-4)
    assert loaded.peft_config["default"].lora_alpha == loaded.peft_config["default"].r == 8


def test_refusals():
    with pytest.raises(ValueError, match="must be between 0 and 1"):
        smolpeft.convert_to_lora(_model(smolpeft), 1.5)
    with pytest.raises(TypeError, match="do not support LoRA conversion: Embedding"):
        smolpeft.convert_to_lora(_model(smolpeft, target_modules=["embed_tokens", "q_proj"]), 2)
    with pytest.raises(TypeError, match="Could not detect any layer"):
        smolpeft.convert_to_lora(tiny.llama(), 2)
    with pytest.raises(ValueError, match="larger than the weight shape"):
        smolpeft.convert_to_lora(_model(smolpeft), 1000)
