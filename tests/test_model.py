"""PeftModel behaviour: merging, disabling, mixed-adapter batches, training, saving, pass-through."""

import pytest
import tiny
import torch
import transformers

import smolpeft
from smolpeft.lora import LoraLayer, ModulesToSave


def _lora(make=tiny.llama, **kw):
    kw = (
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        | kw
    )
    return smolpeft.get_peft_model(make(), smolpeft.LoraConfig(**kw))


def _logits(m, x, **kw):
    if "adapter_names" in kw:
        m.eval()  # one adapter per row is for inference: training mode refuses it, as in peft
    with torch.no_grad():
        return m(input_ids=x, **kw).logits


def test_merge_unmerge_merge_and_unload_keep_outputs():
    model, x = _lora(), tiny.ids()
    ref = _logits(model, x)
    base = _logits(tiny.llama(), x)
    assert not torch.allclose(ref, base, atol=1e-3)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, x), ref, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model, x), ref, atol=1e-5, rtol=0)
    plain = model.merge_and_unload()
    assert type(plain) is transformers.LlamaForCausalLM
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in plain.modules())
    torch.testing.assert_close(_logits(plain, x), ref, atol=1e-5, rtol=0)


def test_disable_and_unload_give_the_base():
    model, x = _lora(), tiny.ids()
    base = _logits(tiny.llama(), x)
    with model.disable_adapter():
        assert torch.equal(_logits(model, x), base)
    assert not torch.equal(_logits(model, x), base)
    assert torch.equal(_logits(model.unload(), x), base)


def test_mixed_batch_equals_per_adapter_rows(tmp_path):
    model = _lora()
    model.add_adapter("b", smolpeft.LoraConfig(r=2, target_modules=["k_proj", "v_proj"], init_lora_weights=False))
    x = tiny.ids(batch=4)
    names = ["b", "default", "__base__", "b"]
    mixed = _logits(model, x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                row = _logits(model, x[i : i + 1])
        else:
            model.set_adapter(name)
            row = _logits(model, x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], row, atol=1e-5, rtol=0)
    # generate: one adapter per row, same tokens as generating with each adapter alone
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=x[:2], adapter_names=["b", "default"], **gen)
    model.set_adapter("default")
    assert torch.equal(out[1:], model.generate(input_ids=x[1:2], **gen))
    model.set_adapter("b")
    assert torch.equal(out[:1], model.generate(input_ids=x[:1], **gen))
    with pytest.raises(ValueError, match=r"non-existing adapter\(s\): nope"):
        model(input_ids=x[:1], adapter_names=["nope"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="when there are merged adapters"):
        model(input_ids=x[:1], adapter_names=["b"])


def test_mixed_batch_equal_ranks_batched_path_follows_weight_updates():
    """Equal ranks take the batched-matmul path (stacked factors, cached): rows match single-adapter runs, a
    __base__ row gets nothing, an in-place weight update is seen, and with gradients on the exact path is used."""
    model = _lora()
    model.add_adapter(
        "b",
        smolpeft.LoraConfig(
            r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    )
    model.eval()
    x = tiny.ids(batch=3)
    names = ["b", "__base__", "default"]

    def rows():
        out = []
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    out.append(_logits(model, x[i : i + 1]))
            else:
                model.set_adapter(name)
                out.append(_logits(model, x[i : i + 1]))
        return torch.cat(out)

    torch.testing.assert_close(_logits(model, x, adapter_names=names), rows(), atol=1e-5, rtol=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.b" in n:
                p.mul_(-2)  # in place: the cached stack must notice
    torch.testing.assert_close(_logits(model, x, adapter_names=names), rows(), atol=1e-5, rtol=0)
    model.set_adapter("b")  # b trains; with gradients on, row 0's gradient equals b run alone on that row
    grads = []
    for kw, rows_ in ((dict(adapter_names=names), slice(0, 3)), ({}, slice(0, 1))):
        model.zero_grad()
        model(input_ids=x[rows_], **kw).logits[0].pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and all(".b." in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)


def test_mixed_batch_with_classification_heads():
    model = _lora(tiny.bert_cls, target_modules=["query", "value"], task_type="SEQ_CLS")
    model.add_adapter(
        "b", smolpeft.LoraConfig(r=2, target_modules=["value"], init_lora_weights=False, task_type="SEQ_CLS")
    )
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["b"].weight.mul_(-3)
    x = tiny.ids(batch=3)
    mixed = _logits(model, x, adapter_names=["b", "__base__", "default"])
    model.set_adapter("b")
    torch.testing.assert_close(mixed[0], _logits(model, x[:1])[0], atol=1e-5, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(mixed[1], _logits(model, x[1:2])[0], atol=1e-5, rtol=0)


def test_training_step_lowers_loss_and_leaves_base_bit_identical():
    model = smolpeft.get_peft_model(tiny.llama(), smolpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    before = {k: v.clone() for k, v in model.base_model.state_dict().items() if "lora_" not in k}

    def only_adapters_have_grads(m):
        assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)

    losses = tiny.train_steps(model, tiny.ids(), steps=4, lr=5e-3, check=only_adapters_have_grads)
    assert losses[-1] < losses[0] - 0.01
    after = model.base_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    results = []
    for checkpointing in (False, True):
        model = _lora()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        x = tiny.ids()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1)
    assert g0.keys() == g1.keys() and len(g0) == 12
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], atol=1e-6, rtol=1e-5)


def test_adapter_management_and_pass_through(tmp_path, capsys):
    model = _lora()
    assert model.config.model_type == "llama" and model.generation_config is not None
    assert model.active_adapter == "default"
    model.add_adapter("b", smolpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.active_adapter == "default"  # adding does not activate
    with pytest.raises(ValueError, match="Adapter c does not exist; known adapters: default, b"):
        model.set_adapter("c")
    model.set_adapter("b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "b/adapter_config.json").exists()
    model.delete_adapter("b")
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
    model.print_trainable_parameters()
    t, n = model.get_nb_trainable_parameters()
    assert (
        capsys.readouterr().out.strip()
        == f"trainable params: {t:,d} || all params: {n:,d} || trainable%: {100 * t / n:.4f}"
    )

    loaded = smolpeft.PeftModel.from_pretrained(tiny.llama(), tmp_path)
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    x = tiny.ids()
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x), atol=1e-6, rtol=0)
    trainable = smolpeft.PeftModel.from_pretrained(tiny.llama(), tmp_path, is_trainable=True)
    assert sum(p.requires_grad for p in trainable.parameters()) == 12


def test_auto_peft_models_load_the_base_from_the_config(tmp_path):
    base_dir = tmp_path / "base"
    tiny.llama().save_pretrained(base_dir)
    model = smolpeft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir), smolpeft.LoraConfig(r=2, init_lora_weights=False)
    )
    assert model.peft_config["default"].base_model_name_or_path == str(base_dir)
    model.save_pretrained(tmp_path / "adapter")
    auto = smolpeft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    x = tiny.ids()
    torch.testing.assert_close(_logits(auto, x), _logits(model, x), atol=1e-6, rtol=0)

    tiny.bert_cls(num_labels=5).save_pretrained(tmp_path / "cls")
    cls = smolpeft.get_peft_model(
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls"),
        smolpeft.LoraConfig(task_type="SEQ_CLS"),
    )
    cls.save_pretrained(tmp_path / "cls-adapter")
    auto = smolpeft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "cls-adapter")
    assert auto.config.num_labels == 5  # read from the saved head's shape
    torch.testing.assert_close(_logits(auto, x), _logits(cls, x), atol=1e-6, rtol=0)


def test_trains_under_transformers_trainer(tmp_path):
    from datasets import Dataset

    model = _lora(init_lora_weights=True)
    x = tiny.ids(batch=8, length=12)
    ds = Dataset.from_dict({"input_ids": x.tolist(), "labels": x.tolist()})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds)
    before = _logits(model, x)
    result = trainer.train()
    assert result.global_step == 8
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert not torch.allclose(_logits(model, x), before)
