"""PEFT's public surface beyond the top-level calls: object graph, names, functions, keywords, merges in half
precision and 8-bit, the model card and push_to_hub. peft is the oracle."""

import warnings

import peft
import pytest
import tiny
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import smolpeft

KW = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], task_type="CAUSAL_LM")


def _pair(make=tiny.llama, **kw):
    kw = kw or KW
    torch.manual_seed(0)
    ours = smolpeft.get_peft_model(make(), smolpeft.LoraConfig(**kw))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    return ours, theirs


def _randomize(*models, seed=5):
    for m in models:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_object_graph_and_names_are_peft_s():
    ours, theirs = _pair()
    assert type(ours).__name__ == type(theirs).__name__ == "PeftModelForCausalLM"
    assert type(ours.base_model).__name__ == type(theirs.base_model).__name__ == "LoraModel"
    assert ours.base_model.model is ours.get_base_model() and type(ours.base_model.model).__name__ == "LlamaForCausalLM"
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    q = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.lora_A["default"], nn.Linear) and q.lora_A["default"].weight.shape == (4, 32)
    assert isinstance(q, smolpeft.tuners.lora.Linear) and not isinstance(q, smolpeft.tuners.lora.Embedding)
    assert isinstance(q, smolpeft.tuners.tuners_utils.BaseTunerLayer)
    assert q.active_adapters == ["default"] and not q.merged and q.weight is q.base_layer.weight
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }


def test_deep_imports_resolve():
    from smolpeft.config import PeftConfig  # noqa: F401
    from smolpeft.peft_model import PeftModel
    from smolpeft.tuners.lora import LoraConfig, LoraModel  # noqa: F401
    from smolpeft.tuners.tuners_utils import BaseTuner  # noqa: F401
    from smolpeft.utils import ModulesToSaveWrapper, PeftType, get_peft_model_state_dict, infer_device  # noqa: F401

    assert PeftModel is smolpeft.PeftModel and infer_device() in ("cpu", "cuda", "mps", "xpu")
    config = smolpeft.AdaLoraConfig(r=2)  # buildable, as PEFT's tests build configs at import time; refused when used
    with pytest.raises(NotImplementedError, match="AdaLoraConfig is a PEFT feature smolpeft does not implement"):
        smolpeft.get_peft_model(tiny.llama(), config)


def test_custom_module_called_positionally_and_several_active_adapters():
    cfg = dict(r=2, target_modules=["lin0", "lin1"])
    torch.manual_seed(0)
    ours = smolpeft.get_peft_model(tiny.MLP(), smolpeft.LoraConfig(**cfg))
    ours.add_adapter("other", smolpeft.LoraConfig(**cfg))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny.MLP(), peft.LoraConfig(**cfg))
    theirs.add_adapter("other", peft.LoraConfig(**cfg))
    _randomize(ours, theirs)
    x = torch.randn(4, 10)
    torch.testing.assert_close(ours(x), theirs(x))
    ours.base_model.set_adapter(["default", "other"])
    theirs.base_model.set_adapter(["default", "other"])
    assert ours.active_adapters == theirs.active_adapters == ["default", "other"]
    torch.testing.assert_close(ours(x), theirs(x))
    ours.base_model.disable_adapter_layers()
    torch.testing.assert_close(ours(x), ours.base_model.model(x))
    ours.base_model.enable_adapter_layers()
    torch.testing.assert_close(ours(x), theirs(x))


def test_state_dict_functions_and_inject_match_peft(tmp_path):
    ours, theirs = _pair()
    _randomize(ours, theirs)
    a, b = smolpeft.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh, _ = _pair()
    result = smolpeft.set_peft_model_state_dict(fresh, b)
    assert not result.unexpected_keys
    x = tiny.ids()
    torch.testing.assert_close(fresh(input_ids=x).logits, theirs(input_ids=x).logits)
    torch.manual_seed(0)
    injected = smolpeft.inject_adapter_in_model(smolpeft.LoraConfig(r=2, target_modules=["lin0"]), tiny.MLP())
    torch.manual_seed(0)
    reference = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["lin0"]), tiny.MLP())
    assert injected.state_dict().keys() == reference.state_dict().keys()


def test_keywords_are_supported_or_refused(tmp_path):
    ours, theirs = _pair()
    _randomize(ours, theirs)
    ours.save_pretrained(tmp_path / "a")
    x = tiny.ids()
    loaded = smolpeft.PeftModel.from_pretrained(
        tiny.llama(),
        tmp_path / "a",
        torch_device="cpu",
        low_cpu_mem_usage=True,
        revision=None,
        device_map="cpu",
        ignore_mismatched_sizes=False,
        autocast_adapter_dtype=True,
    )
    torch.testing.assert_close(loaded(input_ids=x).logits, ours(input_ids=x).logits)
    with pytest.raises(TypeError, match="does not support: colour"):
        smolpeft.PeftModel.from_pretrained(tiny.llama(), tmp_path / "a", colour="red")
    with pytest.raises(TypeError, match="does not support: bogus"):
        ours.save_pretrained(tmp_path / "b", bogus=1)
    with pytest.raises(ValueError, match="mixed=True"):
        smolpeft.get_peft_model(tiny.llama(), smolpeft.LoraConfig(r=2), mixed=True)
    # safe_serialization=False writes PEFT's .bin, which peft reads
    ours.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin/adapter_model.bin").exists() and not (tmp_path / "bin/adapter_model.safetensors").exists()
    back = peft.PeftModel.from_pretrained(tiny.llama(), tmp_path / "bin")
    torch.testing.assert_close(back(input_ids=x).logits, ours(input_ids=x).logits)
    # save_embedding_layers=False leaves the targeted embedding's base weight out; "auto" (default) writes it, as peft
    ours.save_pretrained(tmp_path / "noemb", save_embedding_layers=False)
    assert not any("base_layer" in k for k in load_file(tmp_path / "noemb/adapter_model.safetensors"))
    assert set(load_file(tmp_path / "a/adapter_model.safetensors")) == set(peft.get_peft_model_state_dict(theirs))
    # a model card like PEFT's: Hub metadata over the template; a card already there keeps its text, as in peft
    card = (tmp_path / "a/README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and len(card) > 1000
    (tmp_path / "a/README.md").write_text("---\nmeta: hello\n---\nmine\n")
    ours.save_pretrained(tmp_path / "a")
    theirs.save_pretrained(tmp_path / "p")
    (tmp_path / "p/README.md").write_text("---\nmeta: hello\n---\nmine\n")
    theirs.save_pretrained(tmp_path / "p")
    mine, ref = (yaml.safe_load((tmp_path / d / "README.md").read_text().split("---")[1]) for d in ("a", "p"))
    assert "mine" in (tmp_path / "a/README.md").read_text() and mine["meta"] == "hello"
    assert {k: mine[k] for k in ref} == ref | {"tags": sorted(set(ref["tags"]) | {"smolpeft"})}
    # autocast_adapter_dtype=False keeps a bf16 base's dtype for the adapter, as in peft
    half = smolpeft.get_peft_model(
        tiny.llama().to(torch.bfloat16), smolpeft.LoraConfig(r=2), autocast_adapter_dtype=False
    )
    ref = peft.get_peft_model(tiny.llama().to(torch.bfloat16), peft.LoraConfig(r=2), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in half.named_parameters() if "lora_" in n} == {
        p.dtype for n, p in ref.named_parameters() if "lora_" in n
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merge_is_peft_s_bit_for_bit(dtype):
    kw = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"])
    ours, theirs = _pair(lambda: tiny.llama().to(dtype), **kw)
    _randomize(ours, theirs)
    a, b = ours.merge_and_unload(), theirs.merge_and_unload()
    for (n, p), (m, q) in zip(a.named_parameters(), b.named_parameters()):
        assert n == m and torch.equal(p, q), n


def test_8bit_base_merges_like_peft():
    bnb = pytest.importorskip("bitsandbytes")

    def make():
        torch.manual_seed(0)
        m = tiny.MLP()
        q = bnb.nn.Linear8bitLt(10, 20, bias=True, has_fp16_weights=False)
        q.load_state_dict(m.lin0.state_dict())
        m.lin0 = q.to("cpu")
        m.is_loaded_in_8bit = True  # what transformers sets; peft dispatches its 8-bit layer on it
        return m

    cfg = dict(r=4, lora_alpha=8, target_modules=["lin0"])
    ours, theirs = (
        smolpeft.get_peft_model(make(), smolpeft.LoraConfig(**cfg)),
        peft.get_peft_model(make(), peft.LoraConfig(**cfg)),
    )
    _randomize(ours, theirs)
    x = torch.randn(5, 10)
    with torch.no_grad():
        unmerged = ours(x)
        torch.testing.assert_close(unmerged, theirs(x))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a, b = ours.merge_and_unload(), theirs.merge_and_unload()
        assert type(a.lin0).__name__ == "Linear8bitLt"
        torch.testing.assert_close(a(x), b(x))
        base = make()(x)
        # the adapter is in the merged weights (not dropped): merged output is nearer the adapter's than the base's
        assert (a(x) - unmerged).abs().max() < (base - unmerged).abs().max() / 4


def test_merge_bookkeeping_errors_as_peft():
    ours, _ = _pair()
    ours.add_adapter("b", smolpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    ours.merge_adapter(["b"])
    with pytest.warns(UserWarning, match="already merged"):
        ours.merge_adapter(["b"])
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['b'\] while they are merged"):
        ours.delete_adapter("b")
    ours.unmerge_adapter()
    ours.delete_adapter("b")
    with torch.no_grad():
        ours.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in ours.get_base_model().state_dict().items()}
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        ours.merge_adapter(safe_merge=True)
    after = ours.get_base_model().state_dict()
    assert all(torch.equal(v, after[k]) or v.isnan().any() for k, v in before.items())
    prompt = smolpeft.get_peft_model(
        tiny.llama(), smolpeft.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
    )
    with pytest.raises(AttributeError, match="applies to LoRA adapters"):  # PEFT raises AttributeError here
        prompt.unload()


def test_add_weighted_adapter_refuses_what_it_cannot_combine():
    kw = dict(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    ours = smolpeft.get_peft_model(tiny.bert_cls(), smolpeft.LoraConfig(**kw))
    ours.add_adapter("b", smolpeft.LoraConfig(**kw))
    with pytest.raises(ValueError, match="modules_to_save"):
        ours.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="cat")
    lm, _ = _pair(**dict(r=2, target_modules=["q_proj"]))
    lm.add_adapter("b", smolpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="combination_type='ties' is not supported by smolpeft"):
        lm.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="ties", density=0.5)


def test_push_to_hub_uploads_the_adapter_only(monkeypatch, tmp_path):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message):
            import os

            calls["files"] = sorted(os.listdir(folder_path))
            calls["bytes"] = sum(os.path.getsize(os.path.join(folder_path, f)) for f in calls["files"])
            return "ok"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    ours, _ = _pair(**dict(r=2, target_modules=["q_proj"]))
    assert ours.push_to_hub("me/adapter", token="t") == "ok"
    assert calls["repo"] == "me/adapter" and calls["files"] == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    base_bytes = sum(p.numel() * p.element_size() for p in ours.get_base_model().parameters())
    assert calls["bytes"] < base_bytes / 10


def test_base_model_state_dict_round_trip_matches_peft():
    ours, theirs = _pair()
    a = smolpeft.utils.get_base_model_state_dict(ours)
    b = peft.utils.get_base_model_state_dict(theirs)
    assert a.keys() == b.keys() == tiny.llama().state_dict().keys()
    fresh = {k: torch.randn_like(v) for k, v in a.items()}
    smolpeft.utils.set_base_model_state_dict(ours, fresh)
    assert all(torch.equal(v, fresh[k]) for k, v in smolpeft.utils.get_base_model_state_dict(ours).items())
    with pytest.raises(RuntimeError, match="unexpected keys"):
        smolpeft.utils.set_base_model_state_dict(ours, fresh | {"nope": torch.zeros(1)})
    parent, target, name = smolpeft.utils._get_submodules(ours.get_base_model(), "model.layers.0.self_attn.q_proj")
    assert target is parent.q_proj and name == "q_proj"
    from smolpeft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING[smolpeft.PeftType.LORA] is smolpeft.LoraConfig
