"""Prompt tuning against peft: the same initial prompt for a seed, the same outputs, generate, files both ways."""

import peft
import pytest
import tiny
import torch

import smolpeft

INITS = ["RANDOM", "SAMPLE_VOCAB", "TEXT"]


def _config(lib, init, task, tok_dir, n=5):
    kw = dict(num_virtual_tokens=n, task_type=task, prompt_tuning_init=init)
    if init == "TEXT":
        kw |= dict(prompt_tuning_init_text="classify the weather today", tokenizer_name_or_path=str(tok_dir))
    return lib.PromptTuningConfig(**kw)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tiny.tokenizer(d)
    return d


@pytest.mark.parametrize("init", INITS)
def test_causal_lm_matches_peft(init, tok_dir, tmp_path):
    make = lambda: tiny.llama(vocab=300)  # noqa: E731
    torch.manual_seed(7)
    ours = smolpeft.get_peft_model(make(), _config(smolpeft, init, "CAUSAL_LM", tok_dir))
    torch.manual_seed(7)
    theirs = peft.get_peft_model(make(), _config(peft, init, "CAUSAL_LM", tok_dir))
    # same seed, same initial prompt
    assert torch.equal(ours.prompt_encoder["default"].embedding.weight, theirs.get_prompt_embedding_to_save("default"))
    if init == "TEXT":
        tok = tiny.tokenizer(tmp_path / "t")
        first = tok("classify the weather today")["input_ids"][0]
        assert torch.equal(
            ours.prompt_encoder["default"].embedding.weight[0], make().get_input_embeddings().weight[first]
        )

    x = tiny.ids(vocab=300)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding, as for generation
    with torch.no_grad():
        a = ours(input_ids=x, attention_mask=mask, labels=x)
        b = theirs(input_ids=x, attention_mask=mask, labels=x)
    assert a.logits.shape == (3, 5 + 9, 300)  # virtual positions are part of the output, as in PEFT
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=0)

    # generate() with its KV cache equals greedy decoding by full forward passes. (peft 0.21.2 drifts from its
    # own forward here with left padding and SAMPLE_VOCAB, so the forward pass is the oracle, not peft.generate.)
    ga = ours.generate(input_ids=x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq, m = x, mask
    with torch.no_grad():
        for _ in range(6):
            nxt = ours(input_ids=seq, attention_mask=m).logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(ga, seq) and ga.shape == (3, 9 + 6)

    # files both ways
    ours.save_pretrained(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x, attention_mask=mask).logits, a.logits, atol=1e-5, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    back = smolpeft.PeftModel.from_pretrained(make(), tmp_path / "theirs")
    assert torch.equal(back.prompt_encoder["default"].embedding.weight, ours.prompt_encoder["default"].embedding.weight)
    assert (tmp_path / "ours/adapter_model.safetensors").read_bytes() == (
        tmp_path / "theirs/adapter_model.safetensors"
    ).read_bytes()


def test_sequence_classification_matches_peft(tmp_path):
    torch.manual_seed(1)
    ours = smolpeft.get_peft_model(
        tiny.bert_cls(), smolpeft.PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS")
    )
    with torch.no_grad():
        ours.base_model.classifier.modules_to_save["default"].weight.add_(0.5)  # a trained head must be saved too
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny.bert_cls(), tmp_path / "ours")
    x = tiny.ids()
    types = torch.zeros_like(x)
    with torch.no_grad():
        a = ours(input_ids=x, token_type_ids=types, labels=torch.tensor([0, 2, 1]))
        b = theirs(input_ids=x, token_type_ids=types, labels=torch.tensor([0, 2, 1]))
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=0)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {
        "prompt_encoder.default.embedding.weight",
        "base_model.classifier.modules_to_save.default.weight",
        "base_model.classifier.modules_to_save.default.bias",
    }


def test_prompt_training_changes_only_the_prompt():
    torch.manual_seed(0)
    model = smolpeft.get_peft_model(
        tiny.llama(), smolpeft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    )
    base = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    x = tiny.ids()
    losses = tiny.train_steps(model, x, steps=5, lr=0.1, optimizer=torch.optim.Adam)
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, model.base_model.state_dict()[k]) for k, v in base.items())
    with model.disable_adapter():
        assert model(input_ids=x).logits.shape[1] == 9  # no virtual tokens when disabled


def test_prompt_errors(tmp_path):
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        smolpeft.PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="needs prompt_tuning_init_text"):
        smolpeft.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT")
    model = smolpeft.get_peft_model(
        tiny.llama(), smolpeft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    )
    model.save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match="merge"):
        model.merge_and_unload()
    other = smolpeft.get_peft_model(tiny.gpt2(), smolpeft.LoraConfig(r=2, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="cannot mix PROMPT_TUNING with LORA"):
        other.load_adapter(tmp_path / "p", adapter_name="p")
    bigger = tiny.llama()
    bigger.resize_token_embeddings(128)
    import json

    cfg = json.loads((tmp_path / "p/adapter_config.json").read_text())
    cfg["token_dim"] = 48
    (tmp_path / "p/adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="token_dim=48, the model's embeddings have 32"):
        smolpeft.PeftModel.from_pretrained(tiny.llama(), tmp_path / "p")
