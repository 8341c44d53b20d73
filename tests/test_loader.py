"""The one loader: task type, label names, head size and tokenizer come from the adapter directory and its base."""

import pytest
import tiny
import torch
import transformers

import smolpeft
from smolpeft import storage
from smolpeft.config import TaskType
from smolpeft.loader import load


@pytest.fixture(scope="module")
def cls_adapter(tmp_path_factory):
    """A tiny BERT saved with a 2-label head, and a LoRA adapter trained (here: perturbed) for 3 named labels."""
    d = tmp_path_factory.mktemp("loader")
    tiny.tokenizer(d / "base")
    tiny.bert_cls(vocab=300, num_labels=2).save_pretrained(d / "base")
    base = transformers.BertForSequenceClassification.from_pretrained(
        d / "base", num_labels=3, ignore_mismatched_sizes=True
    )
    model = smolpeft.get_peft_model(
        base,
        smolpeft.LoraConfig(
            r=4,
            target_modules=["query", "value"],
            task_type="SEQ_CLS",
            init_lora_weights=False,
            base_model_name_or_path=str(d / "base"),
        ),
    )
    model.save_pretrained(d / "adapter")
    storage.write_labels(d / "adapter", ["neg", "neu", "pos"])
    return d, model.eval()


def test_classification_adapter_brings_its_labels_and_head(cls_adapter):
    d, trained = cls_adapter
    model, tok, task_type, base = load(adapter=str(d / "adapter"))
    assert task_type == TaskType.SEQ_CLS and base == str(d / "base")
    assert isinstance(model, smolpeft.PeftModel) and not model.training
    assert model.get_base_model().config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert tok.pad_token_id is not None and tok.pad_token_id == model.get_base_model().config.pad_token_id
    x = tiny.ids(vocab=300)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, trained(input_ids=x).logits, atol=1e-5, rtol=0)


def test_label_file_that_disagrees_with_the_head_is_refused(cls_adapter, tmp_path):
    import shutil

    d, _ = cls_adapter
    shutil.copytree(d / "adapter", tmp_path / "a")
    storage.write_labels(tmp_path / "a", ["neg", "pos"])
    with pytest.raises(ValueError, match="names 2 labels, the adapter's head has 3"):
        load(adapter=str(tmp_path / "a"))


def test_causal_lm_base_without_adapter(lm):
    model, tok, task_type, base = load(str(lm / "base"))
    assert task_type == TaskType.CAUSAL_LM and base == str(lm / "base")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token_id is not None


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="give a base model and/or an adapter"):
        load()
    with pytest.raises(ValueError, match="quantize='int8'; expected one of nf4"):
        load("unused", quantize="int8")
