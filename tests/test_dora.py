"""DoRA against peft (the oracle): same initial adapter, outputs, gradients, merges and files, on Linear, Conv1D,
Embedding and 4-bit bases; mixed-adapter batches with DoRA rows; the norm computed without the out×in sum."""

import warnings

import peft
import pytest
import tiny
import torch
import transformers

import smolpeft

CASES = {
    "llama-linear-embedding": (
        tiny.llama,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    ),
    "gpt2-conv1d": (
        lambda: _nodrop(tiny.gpt2()),
        dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    ),
}


def _nodrop(model):
    """GPT-2's own dropout off, so that train-mode outputs are deterministic."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _pair(make, kw, seed=0):
    """The same seeded DoRA adapter built by each library, perturbed alike (B = 0 and m = ||W|| hide mistakes)."""
    models = []
    for lib in (smolpeft, peft):
        torch.manual_seed(seed)
        m = lib.get_peft_model(make(), lib.LoraConfig(use_dora=True, task_type="CAUSAL_LM", **kw))
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for _, p in sorted(m.named_parameters()):
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
        models.append(m)
    return models


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", CASES)
def test_dora_matches_peft(case, tmp_path):
    make, kw = CASES[case]
    torch.manual_seed(0)
    ours = smolpeft.get_peft_model(make(), smolpeft.LoraConfig(use_dora=True, **kw))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(use_dora=True, **kw))
    a, b = smolpeft.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert a.keys() == b.keys() and any(k.endswith("lora_magnitude_vector") for k in a)
    for k in a:  # same initial adapter: m = ||W|| per output
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)

    ours, theirs = _pair(make, kw)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        n for n, p in theirs.named_parameters() if p.requires_grad
    ]
    x = tiny.ids()
    torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), atol=1e-5, rtol=0)
    ours.train(), theirs.train()
    go, gt = _grads(ours, x), _grads(theirs, x)
    for n in gt:  # magnitude, A and B: the norm is a constant in backward in both
        torch.testing.assert_close(go[n], gt[n], atol=1e-5, rtol=1e-4, msg=n)
    # a few optimizer steps: the cached norm follows A and B
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (ours, theirs)]
    for _ in range(2):
        for m, opt in zip((ours, theirs), opts):
            m.zero_grad()
            m(input_ids=x, labels=x).loss.backward()
            opt.step()
    ours.eval(), theirs.eval()
    ref = _logits(theirs, x)
    torch.testing.assert_close(_logits(ours, x), ref, atol=1e-5, rtol=0)

    # files, both ways, byte for byte
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    torch.testing.assert_close(_logits(back, x), ref, atol=1e-5, rtol=0)
    tiny.assert_resaves_identically(back, tmp_path / "ours", tmp_path / "resaved")
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = smolpeft.PeftModel.from_pretrained(make(), tmp_path / "theirs")
    torch.testing.assert_close(_logits(loaded, x), ref, atol=1e-5, rtol=0)
    tiny.assert_resaves_identically(loaded, tmp_path / "theirs", tmp_path / "ours-resaved")

    # merge / unmerge / merge_and_unload
    base = _logits(make(), x)
    ours.merge_adapter()
    torch.testing.assert_close(_logits(ours, x), ref, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    with ours.disable_adapter():
        torch.testing.assert_close(_logits(ours, x), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(ours, x), ref, atol=1e-5, rtol=0)
    plain = ours.merge_and_unload()
    assert not any(isinstance(m, smolpeft.lora.LoraLayer) for m in plain.modules())
    torch.testing.assert_close(_logits(plain, x), ref, atol=1e-5, rtol=0)


def test_dora_with_dropout_trains_like_peft():
    """With lora_dropout the rescaled base term is W·dropout(x), as in PEFT: same loss and gradients, same seed."""
    ours, theirs = _pair(tiny.llama, dict(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.3))
    x = tiny.ids()
    ours.train(), theirs.train()
    torch.manual_seed(1)
    go = _grads(ours, x)
    torch.manual_seed(1)
    gt = _grads(theirs, x)
    for n in gt:
        torch.testing.assert_close(go[n], gt[n], atol=1e-5, rtol=1e-4, msg=n)


def test_two_dora_adapters_merge_like_peft(tmp_path):
    """The second merged adapter's norm is that of the base without the first, as forward computes it."""
    for i in range(2):
        m, _ = _pair(tiny.llama, dict(r=2 + 2 * i, target_modules=["q_proj", "v_proj", "o_proj"]), seed=i)
        m.save_pretrained(tmp_path / f"a{i}")
    x = tiny.ids()
    outs = []
    for lib in (smolpeft, peft):
        m = lib.PeftModel.from_pretrained(tiny.llama(), tmp_path / "a0", adapter_name="a0")
        m.load_adapter(tmp_path / "a1", adapter_name="a1")
        m.base_model.set_adapter(["a0", "a1"])  # both active: the second rescales what the first gave
        unmerged = _logits(m, x)
        m.merge_adapter(["a0", "a1"])
        torch.testing.assert_close(_logits(m, x), unmerged, atol=1e-5, rtol=0)
        outs.append(unmerged)
        if lib is smolpeft:
            m.unmerge_adapter()
            torch.testing.assert_close(_logits(m, x), unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad-batched", "grad-grouped"])
def test_mixed_batch_with_dora_lora_and_base_rows(grad, tmp_path):
    """Each row gets its own adapter (DoRA, plain LoRA, none) and equals the batch run with that adapter alone."""
    dora, _ = _pair(tiny.llama, dict(r=4, target_modules=["q_proj", "v_proj", "o_proj", "embed_tokens"]))
    dora.save_pretrained(tmp_path / "dora")
    model = smolpeft.PeftModel.from_pretrained(tiny.llama(), tmp_path / "dora", adapter_name="dora")
    lora = smolpeft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "o_proj"], init_lora_weights=False)
    model.add_adapter("lora", lora)
    x = tiny.ids(batch=4)
    names = ["dora", "lora", smolpeft.lora.BASE, "dora"]
    with torch.set_grad_enabled(grad):
        mixed = model(input_ids=x, adapter_names=names).logits
    for i, name in enumerate(names):
        if name == smolpeft.lora.BASE:
            with model.disable_adapter():
                alone = _logits(model, x[i : i + 1])
        else:
            model.set_adapter(name)
            alone = _logits(model, x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1].detach(), alone, atol=1e-5, rtol=0, msg=name)


def test_norm_without_the_full_product_equals_the_direct_norm():
    """||W + s·B A|| from ||W||², W Aᵀ and A Aᵀ equals the norm of the formed matrix, per layer type."""
    model = smolpeft.get_peft_model(
        tiny.gpt2(), smolpeft.LoraConfig(r=4, target_modules=["c_attn", "wte"], use_dora=True, init_lora_weights=False)
    )
    model.add_adapter(
        "lin", smolpeft.LoraConfig(r=3, target_modules=["lm_head"], use_dora=True, init_lora_weights=False)
    )
    layers = [m for m in model.modules() if isinstance(m, smolpeft.lora.LoraLayer)]
    assert {type(m.base_layer).__name__ for m in layers} == {"Conv1D", "Embedding", "Linear"}
    for m in layers:
        name = next(iter(m.r))
        direct = m._row_norm(m.base_layer.weight.detach(), m.get_delta_weight(name).detach())
        torch.testing.assert_close(m.weight_norm(name), direct, atol=1e-5, rtol=1e-5)


def test_dora_refusals():
    with pytest.raises(ValueError, match="lora_bias=True is not supported with use_dora"):
        smolpeft.LoraConfig(use_dora=True, lora_bias=True)
    model = smolpeft.get_peft_model(tiny.llama(), smolpeft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    model.add_adapter("b", smolpeft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="cannot combine DoRA adapters"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A Llama-shaped model wide enough for bitsandbytes' CPU blocks (64)."""
    d = tmp_path_factory.mktemp("q")
    tiny.llama(vocab=300, width=128, layers=1).save_pretrained(d)
    return d


def test_dora_over_a_4bit_base_matches_peft(base_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from smolpeft.qlora import bnb_config

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_config())

    kw = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True, init_lora_weights=False)
    torch.manual_seed(0)
    ours = smolpeft.get_peft_model(load(), smolpeft.LoraConfig(**kw))
    assert type(ours.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    torch.manual_seed(0)
    theirs = peft.get_peft_model(load(), peft.LoraConfig(**kw))
    a, b = smolpeft.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    for k in b:  # m computed from the dequantized weight in both
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    x = tiny.ids(vocab=300)
    torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), atol=1e-5, rtol=0)
    go, gt = _grads(ours, x), _grads(theirs, x)
    for n in gt:
        torch.testing.assert_close(go[n], gt[n], atol=1e-5, rtol=1e-4, msg=n)
    ours.save_pretrained(tmp_path)
    back = peft.PeftModel.from_pretrained(load(), tmp_path)
    torch.testing.assert_close(_logits(back, x), _logits(ours, x), atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # re-quantizing warns
        for m in (ours, theirs):  # both re-quantize f ⊙ (W + ΔW) to NF4
            m.merge_adapter()
    torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), atol=1e-4, rtol=0)
