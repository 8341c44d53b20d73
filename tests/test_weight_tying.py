"""ensure_weight_tying against peft (the oracle): on a base whose LM head is its input embedding, the adapters of the
two are one set of tensors, with PEFT's numbers, file keys, config and warnings."""

import json
import warnings

import peft
import pytest
import tiny
import torch
from safetensors.torch import load_file

import smolpeft


def _build(lib, config_kwargs, seed=3):
    torch.manual_seed(seed)
    model = lib.get_peft_model(tiny.llama(tie=True), lib.LoraConfig(**config_kwargs))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # B = 0 would hide a wrong tie; each library draws the same numbers
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.1)
    return model


def _logits(model, x=None):
    x = tiny.ids() if x is None else x
    with torch.no_grad():
        return model(input_ids=x).logits


LORA = dict(r=4, target_modules=["q_proj", "embed_tokens", "lm_head"], ensure_weight_tying=True)
HEADS = dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True)


@pytest.mark.parametrize("kwargs", [LORA, HEADS], ids=["lora", "modules_to_save"])
def test_same_tensors_outputs_and_files_as_peft(kwargs, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = _build(smolpeft, dict(kwargs)), _build(peft, dict(kwargs))
    a, b = smolpeft.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    torch.testing.assert_close(_logits(ours), _logits(theirs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    cfg = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs")]
    for key in ("target_modules", "modules_to_save", "ensure_weight_tying"):
        want = cfg[1][key]
        assert (sorted(cfg[0][key]) if isinstance(want, list) else cfg[0][key]) == (
            sorted(want) if isinstance(want, list) else want
        )
    fa, fb = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert sorted(fa) == sorted(fb)
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], msg=k)


def test_lora_head_shares_the_embedding_factors():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _build(smolpeft, dict(LORA))
    emb, head = model.base_model.model.model.embed_tokens, model.base_model.model.lm_head
    assert head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()
    assert head.lora_B["default"].weight.data_ptr() == emb.lora_embedding_A["default"].data_ptr()
    # one optimizer step through the head moves the embedding's adapter too
    before = emb.lora_embedding_B["default"].detach().clone()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=tiny.ids(), labels=tiny.ids()).loss.backward()
    opt.step()
    assert torch.equal(head.lora_A["default"].weight, emb.lora_embedding_B["default"].T)
    assert not torch.equal(before, emb.lora_embedding_B["default"])


@pytest.mark.parametrize("kwargs", [LORA, HEADS], ids=["lora", "modules_to_save"])
def test_round_trip_through_peft(kwargs, tmp_path):
    """A tied adapter saved by either library loads in the other with the same outputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = _build(smolpeft, dict(kwargs)), _build(peft, dict(kwargs), seed=11)
        ours.save_pretrained(tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "theirs")
        in_peft = peft.PeftModel.from_pretrained(tiny.llama(tie=True), tmp_path / "ours")
        in_ours = smolpeft.PeftModel.from_pretrained(tiny.llama(tie=True), tmp_path / "theirs")
    torch.testing.assert_close(_logits(in_peft), _logits(ours))
    torch.testing.assert_close(_logits(in_ours), _logits(theirs))
    head, emb = in_ours.base_model.model.lm_head, in_ours.base_model.model.model.embed_tokens
    if kwargs is LORA:
        assert head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()
    else:
        assert head.modules_to_save["default"].weight is emb.modules_to_save["default"].weight


def test_merge_adds_the_shared_delta_once():
    """Head and embedding share one weight and one ΔW: merging must give the unmerged outputs (PEFT 0.21 adds the
    delta twice here, so this is checked against our own unmerged model, not against peft)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _build(smolpeft, dict(LORA))
    want = _logits(model)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model), want)
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model), want)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged), want)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert merged.config.tie_word_embeddings


@pytest.mark.parametrize(
    "tie, kwargs, match",
    [
        (True, dict(target_modules=["q_proj", "lm_head"]), "`ensure_weight_tying` is not set to True"),
        (False, dict(target_modules=["q_proj", "lm_head"], ensure_weight_tying=True), "no tied modules were found"),
        (True, dict(target_modules=["q_proj"], ensure_weight_tying=True), "no tied modules are added"),
    ],
)
def test_warnings_as_peft(tie, kwargs, match):
    for lib in (peft, smolpeft):
        with pytest.warns(UserWarning, match=match):
            lib.get_peft_model(tiny.llama(tie=tie), lib.LoraConfig(**kwargs))


def test_merge_and_unload_unties_a_diverged_config():
    """Config says tied, weights are not (as a checkpoint with both tensors loads): merging sets the flag False."""
    for lib in (peft, smolpeft):
        base = tiny.llama(tie=False)
        base.config.tie_word_embeddings = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(base, lib.LoraConfig(target_modules=["embed_tokens"], init_lora_weights=False))
        with pytest.warns(UserWarning, match="Setting.*tie_word_embeddings"):
            merged = model.merge_and_unload()
        assert merged.config.tie_word_embeddings is False, lib.__name__


def test_second_adapter_is_tied_too():
    """PEFT 0.21 finds the tied head under its wrapped name for a second adapter and fails; here it ties again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _build(smolpeft, dict(LORA))
        model.add_adapter("b", smolpeft.LoraConfig(r=2, target_modules=["v_proj", "lm_head"], ensure_weight_tying=True))
    emb, head = model.base_model.model.model.embed_tokens, model.base_model.model.lm_head
    assert head.lora_A["b"].weight.data_ptr() == emb.lora_embedding_B["b"].data_ptr()
    assert head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()
