"""Loading adapters never changes what other adapters or the base compute, never allocates more than the file can
fill, and never leaves dropout on for inference (issue 12, items 3, 4, 6, 12)."""

import json

import peft
import pytest
import tiny
import torch
from torch import nn

import smolpeft
from smolpeft import checkpoint
from smolpeft.lora import LoraLayer

X = tiny.ids()


def _logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=X, **kw).logits


def _saved(tmp_path, name, seed, **kw):
    torch.manual_seed(seed)
    m = smolpeft.get_peft_model(tiny.llama(), smolpeft.LoraConfig(task_type="CAUSAL_LM", **kw))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    m.save_pretrained(tmp_path / name)
    return m, tmp_path / name


def test_loaded_adapters_run_without_dropout_and_mixed_equals_solo(tmp_path):
    _, a = _saved(tmp_path, "a", 1, r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"])
    _, b = _saved(tmp_path, "b", 2, r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"])
    model = smolpeft.PeftModel.from_pretrained(tiny.llama(), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    drops = [m for n, m in model.named_modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 8 and not any(d.training for d in drops)
    model.set_adapter("b")
    assert torch.equal(_logits(model), _logits(model))  # deterministic: dropout is off for the hot-loaded adapter
    names = ["a", "b", "__base__"]
    mixed = _logits(model, adapter_names=names)
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], _logits(model, adapter_names=[n] * 3)[i], atol=1e-5, rtol=0)
    trainable = smolpeft.PeftModel.from_pretrained(tiny.llama(), a, is_trainable=True)
    assert trainable.training or all(p.requires_grad for n, p in trainable.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_adapter_never_rewrites_the_shared_base(tmp_path, init):
    trained, pissa = _saved(tmp_path, "p", 3, r=4, init_lora_weights=init, target_modules=["q_proj", "o_proj"])
    expected = _logits(trained)
    _, plain = _saved(tmp_path, "plain", 4, r=2, target_modules=["v_proj"])
    base_logits = _logits(tiny.llama())

    model = smolpeft.PeftModel.from_pretrained(tiny.llama(), plain, adapter_name="plain")
    before = _logits(model)

    def base_state():  # keys as if unwrapped: a layer that gains an adapter keeps its weight under base_layer
        return {
            k.replace(".base_layer", ""): v.clone()
            for k, v in model.get_base_model().state_dict().items()
            if "lora_" not in k
        }

    base_weights = base_state()
    model.load_adapter(pissa, adapter_name="p")
    after = base_state()
    assert after.keys() == base_weights.keys()
    assert all(torch.equal(base_weights[k], after[k]) for k in base_weights)  # the base is untouched
    torch.testing.assert_close(_logits(model), before)  # the other adapter computes what it did
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), base_logits)
    model.set_adapter("p")
    torch.testing.assert_close(_logits(model), expected, atol=1e-4, rtol=0)  # the principal adapter is exact
    assert model.peft_config["p"].r == 8 and model.peft_config["p"].init_lora_weights is True
    ref = peft.PeftModel.from_pretrained(tiny.llama(), pissa)
    torch.testing.assert_close(_logits(model), _logits(ref), atol=1e-4, rtol=0)
    model.delete_adapter("p")
    torch.testing.assert_close(_logits(model), before)


def test_principal_adapter_saved_as_plain_lora(tmp_path):
    torch.manual_seed(0)
    model = smolpeft.get_peft_model(
        tiny.llama(), smolpeft.LoraConfig(r=4, init_lora_weights="pissa", target_modules=["q_proj"])
    )
    model.save_pretrained(tmp_path / "init")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    cfg = json.loads((tmp_path / "plain/adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True
    ref = peft.PeftModel.from_pretrained(tiny.llama(), tmp_path / "plain")  # on the original base, as plain LoRA
    torch.testing.assert_close(_logits(ref), _logits(model), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="converts PiSSA/OLoRA adapters"):
        smolpeft.get_peft_model(tiny.llama(), smolpeft.LoraConfig(r=2)).save_pretrained(
            tmp_path / "x", path_initial_model_for_weight_conversion=tmp_path / "init"
        )


def test_rank_bomb_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    _, a = _saved(tmp_path, "a", 1, r=4, target_modules=["q_proj"])
    cfg = json.loads((a / "adapter_config.json").read_text())
    model = smolpeft.PeftModel.from_pretrained(tiny.llama(), a, adapter_name="a")
    monkeypatch.setattr(LoraLayer, "add", lambda *a, **k: pytest.fail("allocated an adapter before checking"))
    (a / "adapter_config.json").write_text(json.dumps(cfg | {"r": 500000}))
    with pytest.raises(
        ValueError,
        match=r"key 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' "
        r"has shape \(4, 32\), the model expects \(500000, 32\)",
    ):
        model.load_adapter(a, adapter_name="bomb")
    # a config promising layers the file does not hold
    (a / "adapter_config.json").write_text(
        json.dumps(cfg | {"rank_pattern": {"v_proj": 500000}, "target_modules": ["q_proj", "v_proj"]})
    )
    with pytest.raises(ValueError, match="the config describes .* adapter weights but the file holds"):
        model.load_adapter(a, adapter_name="bomb")
    assert list(model.peft_config) == ["a"]


def test_bad_safetensors_header_is_a_clear_error(tmp_path):
    _, a = _saved(tmp_path, "a", 1, r=2, target_modules=["q_proj"])
    (a / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        smolpeft.PeftModel.from_pretrained(tiny.llama(), a)


def test_bin_adapters_need_a_safe_torch_loader(tmp_path, monkeypatch):
    _, a = _saved(tmp_path, "a", 1, r=2, target_modules=["q_proj"])
    torch.save(checkpoint.read_weights(a), a / "adapter_model.bin")
    (a / "adapter_model.safetensors").unlink()
    assert set(checkpoint.read_weights(a))  # torch >= 2.6 here: weights_only is safe
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(ValueError, match=r"needs torch>=2\.6"):
        checkpoint.read_weights(a)
