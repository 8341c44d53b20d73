"""Bad adapter files get clear errors and leave the model as it was; writes are atomic; no pickle."""

import json
import os
import warnings

import pytest
import tiny
import torch

import smolpeft
from smolpeft import checkpoint
from smolpeft.lora import LoraLayer


@pytest.fixture
def adapter(tmp_path):
    m = smolpeft.get_peft_model(tiny.llama(), smolpeft.LoraConfig(r=4, init_lora_weights=False, task_type="CAUSAL_LM"))
    m.save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def _assert_untouched(model, ref, x):
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref)


def _base_and_ref():
    base, x = tiny.llama(), tiny.ids()
    with torch.no_grad():
        return base, base(input_ids=x).logits, x


def test_missing_and_invalid_files(adapter, tmp_path):
    base = tiny.llama()
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        smolpeft.PeftModel.from_pretrained(base, tmp_path / "nope")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        smolpeft.PeftModel.from_pretrained(base, tmp_path / "empty")
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON"):
        smolpeft.PeftModel.from_pretrained(base, adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type='IA3' is not supported"):
        smolpeft.PeftModel.from_pretrained(base, adapter)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_bad_weights_leave_the_model_untouched(adapter, damage):
    f = adapter / "adapter_model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "garbage":
        f.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    else:
        f.unlink()
    base, ref, x = _base_and_ref()
    with pytest.raises((ValueError, FileNotFoundError), match="not a valid safetensors file|no adapter weights"):
        smolpeft.PeftModel.from_pretrained(base, adapter)
    _assert_untouched(base, ref, x)


def test_wrong_shape_names_the_key_and_both_shapes(adapter):
    w = checkpoint.read_weights(adapter)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    w[key] = torch.zeros(4, 31)
    checkpoint.save_weights(w, adapter)
    base, ref, x = _base_and_ref()
    with pytest.raises(ValueError, match=rf"key '{key}' has shape \(4, 31\), the model expects \(4, 32\)"):
        smolpeft.PeftModel.from_pretrained(base, adapter)
    _assert_untouched(base, ref, x)
    # load_adapter into a live PeftModel: the existing adapter keeps working, the bad one is gone
    model = smolpeft.get_peft_model(tiny.llama(), smolpeft.LoraConfig(r=2, init_lora_weights=False))
    with torch.no_grad():
        before = model(input_ids=x).logits
    with pytest.raises(ValueError, match="has shape"):
        model.load_adapter(adapter, adapter_name="bad")
    assert list(model.peft_config) == ["default"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)


def test_adapter_for_another_architecture(tmp_path):
    gpt = smolpeft.get_peft_model(tiny.gpt2(), smolpeft.LoraConfig(r=2))
    gpt.save_pretrained(tmp_path / "g")
    base, ref, x = _base_and_ref()
    with pytest.raises(ValueError, match=r"target_modules=\['c_attn'\] matched no module of LlamaForCausalLM"):
        smolpeft.PeftModel.from_pretrained(base, tmp_path / "g")
    _assert_untouched(base, ref, x)
    # same layer names, other sizes: a shape error, not a silent mismatch
    small = smolpeft.get_peft_model(tiny.llama(vocab=64), smolpeft.LoraConfig(r=2, target_modules=["embed_tokens"]))
    small.save_pretrained(tmp_path / "s")
    with pytest.raises(ValueError, match=r"shape \(2, 64\), the model expects \(2, 128\)"):
        smolpeft.PeftModel.from_pretrained(base, tmp_path / "s")
    _assert_untouched(base, ref, x)


def test_extra_and_unknown_keys(adapter):
    w = checkpoint.read_weights(adapter)
    w["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    checkpoint.save_weights(w, adapter)
    with pytest.raises(KeyError, match="match no adapter layer.*up_proj"):
        smolpeft.PeftModel.from_pretrained(tiny.llama(), adapter)


def test_config_fields(adapter):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"foo": 1, "bar": "x", "megatron_config": None}))
        smolpeft.PeftModel.from_pretrained(tiny.llama(), adapter)
    msgs = [str(w.message) for w in caught if "ignoring fields" in str(w.message)]
    assert len(msgs) == 1 and msgs[0].endswith("bar, foo")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"use_qalora": True}))
    with pytest.raises(ValueError, match="use_qalora=True is not supported"):
        smolpeft.PeftModel.from_pretrained(tiny.llama(), adapter)


def test_atomic_write_keeps_the_old_file_on_failure(adapter, monkeypatch):
    f = adapter / "adapter_model.safetensors"
    old = f.read_bytes()

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    model = smolpeft.get_peft_model(tiny.llama(), smolpeft.LoraConfig(r=8))
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(adapter)
    assert f.read_bytes() == old
    assert sorted(os.listdir(adapter)) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]  # no temp files


def test_bin_weights_load_without_pickle(adapter, tmp_path):
    w = checkpoint.read_weights(adapter)
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(w, adapter / "adapter_model.bin")
    assert smolpeft.PeftModel.from_pretrained(tiny.llama(), adapter)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, adapter / "adapter_model.bin")
    with pytest.raises(ValueError, match="weights-only"):
        smolpeft.PeftModel.from_pretrained(tiny.llama(), adapter)
    assert not (tmp_path / "pwned").exists()
