"""The lean training loss equals transformers' loss, with and without packing, in value and adapter gradients."""

import pytest
import tiny
import torch

import smolpeft
from smolpeft.data import IGNORE, collate, pack
from smolpeft.loss import TrainingLoss


def _examples(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 14, (1,), generator=g))
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        prompt = length // 2  # the first half is prompt: no loss there
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def _model():
    return smolpeft.get_peft_model(
        tiny.llama(), smolpeft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )


def _loss_and_grads(model, fn):
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1024, 7])  # one chunk, and many chunks each recomputed in backward
def test_lean_loss_matches_transformers_padded(chunk):
    model = _model()
    batch = collate(_examples(), pad_id=0)
    lean = TrainingLoss(model, chunk=chunk)
    assert lean.lean
    plain = _loss_and_grads(model, lambda: model(**batch).loss)
    fast = _loss_and_grads(model, lambda: lean(**batch))
    _assert_same(plain, fast)


def test_packed_rows_match_separate_sequences():
    """Packing changes nothing: no attention across examples, no target across a boundary."""
    model = _model()
    examples = _examples()
    packed = collate(pack(examples, max_length=40), pad_id=0)
    assert packed["input_ids"].shape[0] < len(examples) and "attention_mask" not in packed
    lean = TrainingLoss(model, chunk=5)
    separate = _loss_and_grads(model, lambda: model(**collate(examples, pad_id=0)).loss)
    fast = _loss_and_grads(model, lambda: lean(**packed))
    _assert_same(separate, fast)
    plain_packed = _loss_and_grads(model, lambda: TrainingLoss(model, lean=False)(**packed))
    _assert_same(separate, plain_packed)


def test_prompt_tuning_and_classification_use_the_model_loss():
    pm = smolpeft.get_peft_model(tiny.llama(), smolpeft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    assert not TrainingLoss(pm).lean
    batch = collate(_examples(), pad_id=0)
    torch.testing.assert_close(TrainingLoss(pm)(**batch), pm(**batch).loss)


def test_linear_cross_entropy_gradients_for_a_trainable_head():
    """Full fine-tuning trains the head too: dW from the fused loss equals autograd's."""
    from torch.utils.flop_counter import FlopCounterMode

    from smolpeft.loss import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=g)
    (linear_cross_entropy(h, w, y, 8) * 0.5).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (torch.nn.functional.cross_entropy(h @ w.T, y, reduction="sum") * 0.5).backward()
    torch.testing.assert_close(gh, h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=1e-5)
    # Only the head trains (hidden states frozen): dW alone, no dh.
    w.grad = None
    linear_cross_entropy(h.detach(), w, y, 8).backward()
    torch.testing.assert_close(w.grad, gw * 2, atol=1e-5, rtol=1e-5)
    # Under no_grad (evaluation) no gradient is formed (one head matmul, not three), and the loss is the same.
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        ev = linear_cross_entropy(h, w, y, 8)
    assert flops.get_total_flops() == 2 * 37 * 50 * 16
    torch.testing.assert_close(ev, torch.nn.functional.cross_entropy(h @ w.T, y, reduction="sum"), rtol=1e-6, atol=1e-4)


def test_token_log_probs_per_position_with_metrics_and_weighted_gradients():
    """Per-token log-probs (TRL's fused-head protocol): values, entropy and argmax against full logits, and a
    per-token weighted loss (as TRL's DFT loss weights them) backpropagates exactly; a trainable head refuses it."""
    from smolpeft.loss import token_log_probs

    g = torch.Generator().manual_seed(1)
    h = torch.randn(45, 16, generator=g, requires_grad=True)
    w = torch.randn(70, 16, generator=g)
    y = torch.randint(0, 70, (45,), generator=g)
    y[3] = int((h[3] @ w.T).argmax())  # at least one position where the label is the argmax
    weights = torch.rand(45, generator=g)
    logp, ent, top1 = token_log_probs(h, w, y, 16, metrics=True)
    (logp * weights).sum().backward()
    got = h.grad.clone()
    h.grad = None
    full = torch.log_softmax(h @ w.T, dim=-1)
    want = full.gather(1, y[:, None]).squeeze(1)
    (want * weights).sum().backward()
    torch.testing.assert_close(logp, want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, -(full.exp() * full).sum(-1).detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(top1, (h @ w.T).argmax(-1) == y) and top1.any() and not top1.all()
    assert not top1.requires_grad
    with pytest.raises(RuntimeError, match="entropy is computed for logging"):
        token_log_probs(h, w, y, 16, metrics=True)[1].sum().backward()
    head = w.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="same gradient at every position"):
        (token_log_probs(h, head, y, 16)[0] * weights).sum().backward()


def test_evaluation_through_the_lean_loss_matches_transformers():
    """evaluate() takes LM losses from the chunked path (no batch x vocab logits): same per-token mean as the
    model's own loss over all the labelled tokens."""
    import math

    from smolpeft.train import evaluate

    model, examples = _model(), _examples(n=9, seed=3)
    with torch.no_grad():
        batch = collate(examples, pad_id=0)
        logits = model(**batch).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        want = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE
        )
    got = evaluate(model, examples, "lm", pad_id=0, batch_size=4)  # several batches, weighted by their token counts
    assert got["eval_loss"] == pytest.approx(want.item(), abs=1e-5)
    assert got["eval_perplexity"] == pytest.approx(math.exp(want.item()), rel=1e-5)


# --- PeftModel.forward(..., labels=...) takes the lean path -----------------------------------------------------------


def _reference(model, batch, **kw):
    """transformers' own loss and adapter gradients (the model's forward, no lean path)."""
    base = model.get_base_model()
    with torch.no_grad():  # no autograd: PeftModel.forward leaves the loss to transformers
        want = model(**batch, **kw).loss
    plain = _loss_and_grads(model, lambda: _base_forward(base, batch, **kw).loss)
    torch.testing.assert_close(plain[0], want, atol=1e-6, rtol=0)
    return plain


def _base_forward(base, batch, **kw):
    return type(base).forward(base, **batch, **kw)  # the class's forward: computes logits, then ForCausalLMLoss


@pytest.mark.parametrize("case", ["padded", "unpadded", "packed", "items"])
def test_forward_with_labels_is_lean_and_equals_transformers(case):
    from smolpeft.loss import LeanCausalLMOutput

    model = _model()
    examples = _examples()
    kw = {}
    if case == "unpadded":
        batch = collate([{"input_ids": e["input_ids"][:5], "labels": e["input_ids"][:5]} for e in examples], pad_id=0)
    elif case == "packed":
        batch = collate(pack(examples, max_length=40), pad_id=0)
        kw = {"use_cache": False}
    else:
        batch = collate(examples, pad_id=0)
    if case == "items":  # Trainer's gradient accumulation: sum over this batch / tokens of all accumulated batches
        kw = {"num_items_in_batch": torch.tensor(37)}
    want = _reference(model, batch, **kw)
    out = model(**batch, **kw)
    assert isinstance(out, LeanCausalLMOutput) and "logits" not in dict(out.items())
    got = _loss_and_grads(model, lambda: model(**batch, **kw).loss)
    _assert_same(want, got)


def test_lean_output_computes_logits_on_access():
    model = _model()
    batch = collate(_examples(), pad_id=0)
    with torch.no_grad():
        want = model.get_base_model()(**batch)
    out = model(**batch)
    torch.testing.assert_close(out.logits, want.logits)  # attribute access builds them ...
    assert list(out.keys())[:2] == ["loss", "logits"]  # ... in transformers' field order
    torch.testing.assert_close(model(**batch)["logits"], want.logits)
    torch.testing.assert_close(model(**batch)[1], want.logits)
    out = model(**batch)
    out.logits.sum().backward()  # and they are differentiable, like transformers'
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_prompt_tuning_forward_is_lean_too():
    pm = smolpeft.get_peft_model(tiny.llama(), smolpeft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    batch = collate(_examples(), pad_id=0)
    with torch.no_grad():
        want = pm(**batch).loss
    got = pm(**batch)
    assert "logits" not in dict(got.items())
    torch.testing.assert_close(got.loss, want, atol=1e-5, rtol=0)


def test_models_that_scale_logits_keep_their_own_forward():
    model = _model()
    batch = collate(_examples(), pad_id=0)
    model.get_base_model().config.final_logit_softcapping = 30.0
    assert "logits" in dict(model(**batch).items())  # softcapping is applied after the head: not lean


def test_fused_head_forward_with_labels_or_shift_labels():
    """TRL's fused-head protocol (smolpeft.trl): the loss equals transformers' with labels or with the same targets
    pre-shifted (as context parallelism passes them), per-token log-probs are zero where the label is -100, and a
    call with neither is refused."""
    from smolpeft.loss import fused_head_forward

    model = tiny.llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = IGNORE
    want = model(input_ids=ids, labels=labels).loss
    a = fused_head_forward(model, input_ids=ids, labels=labels)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    b = fused_head_forward(model, input_ids=ids, shift_labels=shifted)
    torch.testing.assert_close(a["loss"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b["loss"], want, atol=1e-5, rtol=1e-5)
    assert a["log_probs"].shape == (2, 8) and torch.equal(a["label_mask"], labels[:, 1:] != IGNORE)
    assert (a["log_probs"][~a["label_mask"]] == 0).all() and (a["log_probs"][a["label_mask"]] < 0).all()
    with pytest.raises(ValueError, match="needs labels"):
        fused_head_forward(model, input_ids=ids)
