"""PeftModel / LoraModel behaviours PEFT's own tests check, each against real peft: the same warnings and errors,
the same outputs, the same files."""

from __future__ import annotations

import re
import warnings

import peft
import pytest
import tiny
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import smolpeft


def _warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


def _card(path) -> dict:
    return yaml.safe_load(path.read_text().split("---")[1])


@pytest.mark.parametrize("make", [tiny.MLP, tiny.llama], ids=["custom", "transformers"])
def test_model_card_and_base_name_are_peft_s(tmp_path, make):
    for lib in (peft, smolpeft):
        cfg = lib.LoraConfig(target_modules=["lin0"] if make is tiny.MLP else None, base_model_name_or_path="custom")
        msgs = _warnings(lambda g=lib.get_peft_model, c=cfg, d=tmp_path / lib.__name__: g(make(), c).save_pretrained(d))
        assert any("was renamed from 'custom' to 'None'" in m for m in msgs), msgs
    ours, theirs = (_card(tmp_path / d / "README.md") for d in ("smolpeft", "peft"))
    assert ours.pop("tags") == sorted(set(theirs.pop("tags")) | {"smolpeft"})
    assert ours == theirs
    assert len((tmp_path / "smolpeft/README.md").read_text()) > 1000  # the Hub's template, filled in as peft does


def test_save_embedding_layers_warns_as_peft(tmp_path):
    def run(lib, model, target, save):
        m = lib.get_peft_model(model, lib.LoraConfig(target_modules=target, init_lora_weights=False))
        return [w for w in _warnings(lambda: m.save_pretrained(tmp_path, save_embedding_layers=save)) if "embed" in w]

    for target, save in ((["q_proj", "embed_tokens"], "auto"), (["q_proj"], "auto"), (["q_proj"], True)):
        assert run(smolpeft, tiny.llama(), target, save) == run(peft, tiny.llama(), target, save)
    # a model without get_input_embeddings: nothing is saved, and both say why
    emb = [nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4)) for _ in range(2)]
    assert run(smolpeft, emb[0], ["1"], True) == run(peft, emb[1], ["1"], True) != []


def test_low_cpu_mem_usage_puts_adapters_on_meta_then_loads_them(tmp_path):
    x = tiny.ids()
    for lib in (peft, smolpeft):
        m = lib.get_peft_model(tiny.llama(), lib.LoraConfig(r=2), low_cpu_mem_usage=True)
        assert {p.device.type for n, p in m.named_parameters() if "lora_" in n} == {"meta"}, lib.__name__
    ours = smolpeft.get_peft_model(tiny.llama(), smolpeft.LoraConfig(r=2, init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    for lib in (peft, smolpeft):
        m = lib.PeftModel.from_pretrained(tiny.llama(), tmp_path, low_cpu_mem_usage=True)
        m.load_adapter(tmp_path, "other", low_cpu_mem_usage=True)
        assert {p.device.type for p in m.parameters()} == {"cpu"}
        torch.testing.assert_close(m(input_ids=x).logits, ours(input_ids=x).logits)
        # the low-level path: inject on meta, then a state dict with the bare model's keys
        bare = lib.inject_adapter_in_model(lib.LoraConfig(r=2), tiny.llama(), low_cpu_mem_usage=True)
        assert {p.device.type for p in bare.parameters()} == {"cpu", "meta"}
        sd = {k.removeprefix("base_model.model."): v for k, v in smolpeft.get_peft_model_state_dict(ours).items()}
        assert not lib.set_peft_model_state_dict(bare, sd, low_cpu_mem_usage=True).unexpected_keys
        torch.testing.assert_close(bare(input_ids=x).logits, ours(input_ids=x).logits)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_load_into_a_model_whose_config_trains_none(bias):
    """PEFT loads a state dict non-strictly: the biases trained under bias=... land in a bias="none" model too."""
    outs = []
    for lib in (peft, smolpeft):
        torch.manual_seed(0)
        m = lib.get_peft_model(
            tiny.MLP(), lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False, bias=bias)
        ).eval()
        with torch.no_grad():
            m.base_model.model.lin0.base_layer.bias.fill_(1.23)
            m.base_model.model.lin1.bias.fill_(-0.5 if bias == "all" else 0.0)  # saved with "all" only
        sd = lib.get_peft_model_state_dict(m)
        torch.manual_seed(0)
        fresh = lib.get_peft_model(tiny.MLP(), lib.LoraConfig(target_modules=["lin0"]))
        with torch.no_grad():
            fresh.base_model.model.lin1.bias.zero_()
        result = lib.set_peft_model_state_dict(fresh, sd)
        x = torch.randn(3, 10)
        torch.testing.assert_close(fresh(x), m(x))
        outs.append((sorted(sd), sorted(result.unexpected_keys)))
    assert outs[0] == outs[1]


def _grads(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_enabling_disabling_and_inference_mode_set_requires_grad_as_peft():
    def script(lib):
        model = lib.get_peft_model(tiny.MLP(), lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
        seen = [_grads(model)]
        model.disable_adapter_layers()
        seen.append(_grads(model))
        with model.disable_adapter():  # all disabled before: still disabled after
            seen.append(_grads(model))
        seen.append([m.disable_adapters for m in model.modules() if hasattr(m, "lora_A")])
        model.enable_adapter_layers()
        with model.disable_adapter():
            seen.append(_grads(model))
        seen.append(_grads(model))
        model.set_adapter("other", inference_mode=True)
        seen.append(_grads(model))
        model.set_adapter("other")
        seen.append(_grads(model))
        layer = model.base_model.model.lin0
        seen.append((layer.adapter_layer_names[:4], layer.other_param_names[:5]))
        layer.enable_adapters(False)  # one layer off on its own
        seen.append((_grads(model), layer.disable_adapters))
        return seen

    assert script(smolpeft) == script(peft)


def test_irregular_enabled_state_warns_and_ends_enabled():
    x = torch.randn(2, 10)
    outs = []
    for lib in (peft, smolpeft):
        torch.manual_seed(0)
        cfg = lib.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False)
        model = lib.get_peft_model(tiny.MLP(), cfg).eval()
        layers = [m for m in model.modules() if hasattr(m, "lora_A")]
        layers[0].enable_adapters(False)  # lin0 runs its base only, lin1 its adapter
        with torch.no_grad():
            outs.append(model(x))
        with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
            with model.disable_adapter():
                pass
        assert [m.disable_adapters for m in layers] == [False, False]
    torch.testing.assert_close(outs[0], outs[1])


def test_merging_again_warns_peft_s_words():
    for lib in (peft, smolpeft):
        model = lib.get_peft_model(tiny.MLP(), lib.LoraConfig(target_modules=["lin0"]))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"]))
        model.merge_adapter()
        with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
            model.merge_adapter()
        with pytest.warns(
            UserWarning, match="Already following adapters were merged default. You are now additionally"
        ):
            model.merge_adapter(["default", "other"])
        with pytest.raises(TypeError, match="adapter_names should be a list of strings"):
            model.base_model.merge_adapter("other")


def test_refusals_use_peft_s_messages():
    x = torch.randn(4, 10)
    for lib in (peft, smolpeft):
        cfg = dict(target_modules=["lin0"], modules_to_save=["lin1"])
        model = lib.get_peft_model(tiny.MLP(), lib.LoraConfig(**cfg))
        model.add_adapter("other", lib.LoraConfig(**cfg))
        with pytest.raises(ValueError, match="Adapter with name 'other' already exists"):
            model.add_adapter("other", lib.LoraConfig(**cfg))
        with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
            model.base_model.set_adapter(["default", "other"])
        with pytest.raises(ValueError, match=r"same module with modules_to_save, but found 1 such instance\(s\)"):
            model.add_weighted_adapter(["default", "other"], weights=[1.0, 1.0], adapter_name="sum")
        with pytest.raises(ValueError, match=r"Cannot pass `adapter_names` when the model is in training mode"):
            model.train()(x, adapter_names=["default"] * 4)
        model.eval()
        with pytest.raises(ValueError, match=re.escape("non-existing adapter(s): nope, nope2")):
            model(x, adapter_names=["nope2", "nope", "default", "default"])
        with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
            model(x, adapter_names=["default"] * 3)
        model.merge_adapter()
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
            model(x, adapter_names=["default"] * 4)
        with pytest.raises(ValueError, match="Please specify `target_modules`"):
            lib.get_peft_model(tiny.MLP(), lib.LoraConfig())


def test_layer_repr_names_peft_s_classes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.emb = nn.Linear(10, 20), nn.Embedding(100, 5)

    for lib in (peft, smolpeft):
        m = lib.get_peft_model(M(), lib.LoraConfig(target_modules=["lin0", "emb"])).base_model.model
        assert repr(m.lin0).startswith("lora.Linear(\n  ") and "in_features=10, out_features=20" in repr(m.lin0)
        assert repr(m.emb).startswith("lora.Embedding(\n  ") and "Embedding(100, 5)" in repr(m.emb)
        assert "lora_embedding_A" in repr(m.emb) and "default" in repr(m.emb)


@pytest.mark.parametrize("name", ["lora", "ora_", "adapter"])
def test_adapter_names_inside_the_prefix_warn_as_peft(name):
    def msgs(lib):
        return [
            m for m in _warnings(lambda: lib.get_peft_model(tiny.MLP(), lib.LoraConfig(target_modules=["lin0"]), name))
        ]

    ours, theirs = ([m for m in msgs(lib) if "should not be contained in the prefix" in m] for lib in (smolpeft, peft))
    assert ours == theirs and bool(ours) == (name != "adapter")


@pytest.mark.parametrize("task", ["TOKEN_CLS", "QUESTION_ANS"])
def test_token_classification_and_qa_train_and_save_their_heads_as_peft(task, tmp_path):
    from transformers import BertConfig, BertForQuestionAnswering, BertForTokenClassification

    cls = BertForTokenClassification if task == "TOKEN_CLS" else BertForQuestionAnswering
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    x = torch.randint(0, 64, (2, 7))
    out = {}
    for lib in (peft, smolpeft):
        torch.manual_seed(0)
        kw = dict(r=2, target_modules=["query", "value"], init_lora_weights=False, task_type=task)
        model = lib.get_peft_model(cls(cfg), lib.LoraConfig(**kw)).eval()
        assert type(model).__name__ == {"TOKEN_CLS": "PeftModelForTokenClassification"}.get(
            task, "PeftModelForQuestionAnswering"
        )
        model.save_pretrained(tmp_path / lib.__name__)
        with torch.no_grad():
            res = model(input_ids=x)
        out[lib.__name__] = (_grads(model), res.logits if task == "TOKEN_CLS" else res.start_logits)
    assert out["smolpeft"][0] == out["peft"][0]  # the same tensors train (the head among them)
    torch.manual_seed(0)  # the same base as peft's
    back = smolpeft.PeftModel.from_pretrained(cls(cfg), tmp_path / "peft")
    assert type(back) is type(model)
    with torch.no_grad():
        res = back(input_ids=x)
    torch.testing.assert_close(res.logits if task == "TOKEN_CLS" else res.start_logits, out["peft"][1])
    assert sorted(load_file(tmp_path / "smolpeft/adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "peft/adapter_model.safetensors")
    )
    with pytest.raises(ValueError, match=f"PromptTuningConfig.task_type='{task}' is not supported"):
        smolpeft.get_peft_model(cls(cfg), smolpeft.PromptTuningConfig(num_virtual_tokens=2, task_type=task))


def test_scaled_embeddings_scale_the_lora_delta_as_peft():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8,
    )  # fmt: skip
    x = torch.arange(10)[None]
    outs = []
    for lib in (peft, smolpeft):
        torch.manual_seed(0)
        base = Gemma3ForCausalLM(cfg)
        model = lib.get_peft_model(base, lib.LoraConfig(target_modules=["embed_tokens"], init_lora_weights=False))
        emb = model.base_model.model.get_input_embeddings()
        with torch.no_grad():
            unmerged = emb(x)
            model.merge_adapter()
            torch.testing.assert_close(emb(x), unmerged, atol=1e-5, rtol=1e-5)
            model.unmerge_adapter()
            base.get_input_embeddings().base_layer.embed_scale.fill_(0)
            assert (emb(x) == 0).all()
        outs.append(unmerged)
    torch.testing.assert_close(outs[0], outs[1])


def test_size_mismatch_raises_what_peft_raises_and_can_be_skipped(tmp_path):
    class Emb(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.emb = nn.Embedding(n, 5)

    model = smolpeft.get_peft_model(Emb(100), smolpeft.LoraConfig(target_modules=["emb"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    for lib in (peft, smolpeft):
        with pytest.raises(RuntimeError, match=r"size mismatch.*100.*105|size mismatch.*105.*100"):
            lib.PeftModel.from_pretrained(Emb(105), tmp_path)
        with pytest.warns(UserWarning, match="ignored because you passed `ignore_mismatched_sizes=True`"):
            lib.PeftModel.from_pretrained(Emb(105), tmp_path, ignore_mismatched_sizes=True)


def test_mixed_batch_over_a_module_returning_a_tuple_raises_as_peft():
    class WithGRU(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.gru = nn.Linear(10, 8), nn.GRU(8, 4, batch_first=True)

        def forward(self, x):
            return self.gru(self.lin0(x).unsqueeze(1))[0]

    for lib in (peft, smolpeft):
        cfg = dict(target_modules=["lin0"], modules_to_save=["gru"], init_lora_weights=False)
        model = lib.get_peft_model(WithGRU(), lib.LoraConfig(**cfg), "a").eval()
        model.add_adapter("b", lib.LoraConfig(**cfg))
        with pytest.raises(TypeError, match="Mixed batching is only supported for the following modules: Linear"):
            model(torch.randn(4, 10), adapter_names=["a", "b", "a", "b"])
