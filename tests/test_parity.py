"""smolpeft against peft (the oracle): same outputs, and each library loads the other's files, byte for byte."""

import peft
import pytest
import tiny
import torch

import smolpeft

CASES = {
    "llama": (tiny.llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    "llama-rslora-several": (
        tiny.llama,
        dict(
            r=4,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"],
            task_type="CAUSAL_LM",
        ),
    ),
    "llama-modules_to_save": (
        tiny.llama,
        dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM"),
    ),
    "llama-embedding": (tiny.llama, dict(r=2, target_modules=["embed_tokens", "v_proj"], task_type="CAUSAL_LM")),
    "llama-all-linear": (tiny.llama, dict(r=2, target_modules="all-linear", task_type="CAUSAL_LM")),
    "gpt2-conv1d": (
        tiny.gpt2,
        dict(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
    ),
    "bert-cls": (tiny.bert_cls, dict(r=4, lora_alpha=8, task_type="SEQ_CLS")),
    "minilm-cls": (
        tiny.minilm_cls,
        dict(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS"),
    ),
}


def _inputs(make):
    vocab = 1000 if make is tiny.minilm_cls else 128
    x = tiny.ids(vocab=vocab)
    mask = torch.ones_like(x)
    mask[0, -3:] = 0
    return dict(input_ids=x, attention_mask=mask)


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("case", CASES)
def test_ours_loads_in_peft_and_theirs_in_ours(case, tmp_path):
    make, kw = CASES[case]
    inputs = _inputs(make)

    ours = smolpeft.get_peft_model(make(), smolpeft.LoraConfig(**kw))
    tiny.perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    torch.testing.assert_close(_out(ours, inputs), _out(theirs, inputs), atol=1e-5, rtol=0)
    # byte-compatible: what peft writes back from our file is our file
    tiny.assert_resaves_identically(theirs, tmp_path / "ours", tmp_path / "resaved")

    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kw))
    tiny.perturb(theirs, seed=6)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = smolpeft.PeftModel.from_pretrained(make(), tmp_path / "theirs")
    torch.testing.assert_close(_out(ours, inputs), _out(theirs, inputs), atol=1e-5, rtol=0)
    tiny.assert_resaves_identically(ours, tmp_path / "theirs", tmp_path / "ours-resaved")


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_same_seed_same_adapter(init):
    """A seeded script gets PEFT's initial adapter, number for number."""
    kw = dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=init, task_type="CAUSAL_LM")
    torch.manual_seed(3)
    ours = smolpeft.get_peft_model(tiny.llama(), smolpeft.LoraConfig(**kw))
    a = {k: v.clone() for k, v in smolpeft.checkpoint.get_peft_model_state_dict(ours).items() if "base_layer" not in k}
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny.llama(), peft.LoraConfig(**kw))
    b = {k: v for k, v in peft.get_peft_model_state_dict(theirs).items() if "base_layer" not in k}
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _weighted_pair(tmp_path):
    """Two saved adapters of different rank, loaded into both libraries."""
    for i, r in enumerate([2, 4]):
        m = smolpeft.get_peft_model(
            tiny.llama(),
            smolpeft.LoraConfig(
                r=r,
                lora_alpha=2 * r,
                target_modules=["q_proj", "v_proj"] if i else ["q_proj", "o_proj"],
                task_type="CAUSAL_LM",
            ),
        )
        tiny.perturb(m, seed=10 + i)
        m.save_pretrained(tmp_path / f"a{i}")
    models = []
    for lib in (smolpeft, peft):
        m = lib.PeftModel.from_pretrained(tiny.llama(), tmp_path / "a0", adapter_name="a0")
        m.load_adapter(tmp_path / "a1", adapter_name="a1")
        models.append(m)
    return models


@pytest.mark.parametrize("kind", ["cat", "svd", "linear"])
def test_add_weighted_adapter_matches_peft(kind, tmp_path):
    ours, theirs = _weighted_pair(tmp_path)
    if kind == "linear":  # linear needs equal ranks: combine an adapter with itself
        args = (["a1", "a1"], [0.7, 0.5])
    else:
        args = (["a0", "a1"], [0.7, -0.4])
    for m in (ours, theirs):
        m.add_weighted_adapter(*args, adapter_name="mix", combination_type=kind)
        m.set_adapter("mix")
    x = dict(input_ids=tiny.ids())
    torch.testing.assert_close(_out(ours, x), _out(theirs, x), atol=1e-5, rtol=0)
    if kind == "cat":  # cat is exact: ΔW = Σ wᵢ ΔWᵢ on every layer either adapter touches
        layers = {n: m for n, m in ours.named_modules() if hasattr(m, "get_delta_weight") and "mix" in m.r}
        assert {n.rsplit(".", 1)[-1] for n in layers} == {"q_proj", "v_proj", "o_proj"}
        for n, m in layers.items():
            want = sum(w * m.get_delta_weight(a) for a, w in zip(args[0], args[1]) if a in m.r)
            torch.testing.assert_close(m.get_delta_weight("mix"), want, atol=1e-6, rtol=1e-5, msg=n)


def test_weighted_linear_needs_equal_rank(tmp_path):
    ours, _ = _weighted_pair(tmp_path)
    with pytest.raises(ValueError, match=r"equal r, found \[2, 4\]"):
        ours.add_weighted_adapter(["a0", "a1"], [1.0, 1.0], "mix", combination_type="linear")


def test_peft_style_script_gives_peft_numbers(tmp_path):
    """The same script, run with `peft` and with `smolpeft as peft`, prints the same numbers."""

    def script(peft, out):
        torch.manual_seed(0)
        model = peft.get_peft_model(
            tiny.llama(),
            peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type=peft.TaskType.CAUSAL_LM),
        )
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        x = tiny.ids()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        model.save_pretrained(out)
        m2 = peft.PeftModel.from_pretrained(tiny.llama(), out, adapter_name="a")
        m2.load_adapter(out, adapter_name="b")
        m2.set_adapter("b")
        with torch.no_grad():
            adapted = m2(input_ids=x).logits
            with m2.disable_adapter():
                base = m2(input_ids=x).logits
            merged = m2.merge_and_unload()(input_ids=x).logits
        return loss.item(), adapted, base, merged, type(m2.get_base_model()).__name__

    ours = script(smolpeft, tmp_path / "ours")
    theirs = script(peft, tmp_path / "theirs")
    assert ours[0] == pytest.approx(theirs[0], abs=1e-6)
    for a, b in zip(ours[1:4], theirs[1:4]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert ours[4] == theirs[4] == "LlamaForCausalLM"
    assert not torch.allclose(ours[1], ours[2])  # the adapter trained away from the base


def test_trainable_parameter_count_matches_peft():
    kw = dict(r=4, target_modules="all-linear", task_type="SEQ_CLS")
    ours = smolpeft.get_peft_model(tiny.bert_cls(), smolpeft.LoraConfig(**kw))
    theirs = peft.get_peft_model(tiny.bert_cls(), peft.LoraConfig(**kw))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)
    keys_ours = set(load_file_keys(ours))
    assert keys_ours == set(peft.get_peft_model_state_dict(theirs))


def load_file_keys(m):
    return smolpeft.checkpoint.get_peft_model_state_dict(m).keys()
