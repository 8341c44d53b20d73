"""Configs against peft as the oracle: same dict, same files both ways, same errors where PEFT's tests check them."""

import copy
import json
import pickle
import warnings

import peft
import pytest

import smolpeft
from smolpeft import LoraConfig, PeftConfig, PromptTuningConfig
from smolpeft.config import AdapterNotFoundError, load_config

LORA_CASES = [
    {},
    dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", lora_dropout=0.1),
    dict(target_modules=r".*\.(q|v)_proj", use_rslora=True, init_lora_weights="gaussian", inference_mode=True),
    dict(
        target_modules=["q"],
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        rank_pattern={"q": 2},
        alpha_pattern={"q": 4},
    ),
    dict(target_modules="all-linear", exclude_modules=["lm_head"], modules_to_save=["score"], task_type="SEQ_CLS"),
    dict(use_dora=False, lora_bias=False, bias="none"),  # PEFT's "off" values are accepted
]
PROMPT_CASES = [
    {},
    dict(num_virtual_tokens=5, task_type="CAUSAL_LM"),
    dict(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi", tokenizer_name_or_path="gpt2"),
]
CASES = [(LoraConfig, peft.LoraConfig, kw) for kw in LORA_CASES] + [
    (PromptTuningConfig, peft.PromptTuningConfig, kw) for kw in PROMPT_CASES
]
IDS = [f"{ours.__name__}-{i}" for i, (ours, _, _) in enumerate(CASES)]


def _comparable(d: dict) -> dict:
    """Drop the writer's version; PEFT keeps sets where we keep sorted lists."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in d.items() if k != "peft_version"}


@pytest.mark.parametrize("ours, theirs, kw", CASES, ids=IDS)
def test_to_dict_equals_peft(ours, theirs, kw):
    assert _comparable(ours(**kw).to_dict()) == _comparable(theirs(**kw).to_dict())


@pytest.mark.parametrize("ours, theirs, kw", CASES, ids=IDS)
def test_files_load_both_ways(ours, theirs, kw, tmp_path):
    ours(**kw).save_pretrained(tmp_path / "ours")
    theirs(**kw).save_pretrained(tmp_path / "theirs")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither side may find a field it does not know
        in_peft = peft.PeftConfig.from_pretrained(tmp_path / "ours")
        in_ours = PeftConfig.from_pretrained(tmp_path / "theirs")
    assert type(in_peft) is theirs and type(in_ours) is ours
    assert _comparable(in_peft.to_dict()) == _comparable(theirs(**kw).to_dict())
    assert _comparable(in_ours.to_dict()) == _comparable(ours(**kw).to_dict())
    assert in_ours.peft_version == peft.__version__  # the writer's version is kept, not replaced by ours


def test_from_pretrained_and_json_file(tmp_path):
    config = LoraConfig(r=2, target_modules=["q"])
    config.save_pretrained(tmp_path)
    for cls in (PeftConfig, LoraConfig, PromptTuningConfig):  # PEFT dispatches on peft_type, whatever the class
        loaded = cls.from_pretrained(tmp_path)
        assert isinstance(loaded, LoraConfig) and isinstance(loaded, PeftConfig)
        assert loaded.to_dict() == config.to_dict()
    assert PeftConfig.from_pretrained(tmp_path.parent, subfolder=tmp_path.name).r == 2
    assert load_config(tmp_path).to_dict() == config.to_dict()
    raw = PeftConfig.from_json_file(tmp_path / "adapter_config.json")
    assert raw == config.to_dict()
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw | {"runtime_config": {"ephemeral_gpu_offload": True}}))
    with pytest.warns(UserWarning, match="runtime_config"):
        assert LoraConfig.from_json_file(tmp_path / "adapter_config.json") == raw


def test_from_peft_type():
    assert type(PeftConfig.from_peft_type(peft_type="LORA", r=2)) is LoraConfig
    assert type(PeftConfig.from_peft_type(peft_type=smolpeft.PeftType.PROMPT_TUNING)) is PromptTuningConfig
    assert type(LoraConfig.from_peft_type(r=2)) is LoraConfig
    with pytest.raises(TypeError, match="missing required keys"):
        PeftConfig.from_peft_type(r=2)


def test_unknown_fields_warn_like_peft(tmp_path):
    LoraConfig().save_pretrained(tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(d | {"foobar": "baz", "spam": 123}))
    msg = "Unexpected keyword arguments ['foobar', 'spam'] for class LoraConfig, these are ignored."
    for lib in (peft, smolpeft):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = lib.PeftConfig.from_pretrained(tmp_path)
        assert [str(w.message).startswith(msg) for w in caught] == [True], lib.__name__
        assert "foobar" not in loaded.to_dict()


def test_bad_files(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"foo": "bar"}))
    for lib in (peft, smolpeft):
        with pytest.raises(TypeError, match=r"missing required keys: \{'peft_type'\}"):
            lib.LoraConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type='IA3' is not supported"):
        PeftConfig.from_pretrained(tmp_path)
    with pytest.raises(AdapterNotFoundError, match="adapter_config.json is missing"):
        PeftConfig.from_pretrained(tmp_path / "..")  # a directory without a config is not looked up on the Hub
    assert issubclass(AdapterNotFoundError, FileNotFoundError) and issubclass(AdapterNotFoundError, ValueError)


@pytest.mark.parametrize(
    "kw",
    [
        dict(use_qalora=True),
        dict(bias="some"),
        dict(trainable_token_indices=[1]),
        dict(layer_replication=[(0, 2)]),
        dict(init_lora_weights="lora_ga"),
    ],
)
def test_refuses_features_it_does_not_implement(kw, tmp_path):
    """Never computes something else silently: as a keyword and in a PEFT file."""
    with pytest.raises(ValueError, match="not supported|expected"):
        LoraConfig(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own notes about defaults it fills in
        peft.LoraConfig(target_modules=["q"], **kw).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not supported|expected"):
        PeftConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kw",
    [
        dict(task_type="invalid-task-type"),
        dict(target_modules=".*foo", layers_to_transform=[0]),
        dict(target_modules=".*foo", layers_pattern=["bar"]),
        dict(target_modules=["foo"], layers_pattern="model.layers"),
    ],
)
def test_lora_errors_match_peft(kw):
    with pytest.raises(ValueError) as theirs:
        peft.LoraConfig(**kw)
    with pytest.raises(ValueError) as ours:
        LoraConfig(**kw)
    assert str(ours.value) == str(theirs.value)


def test_prompt_tuning_checks():
    assert PromptTuningConfig().num_virtual_tokens is None  # PEFT builds it without one; the model needs it
    with pytest.raises(ValueError, match="positive integer"):
        PromptTuningConfig(num_virtual_tokens=0)
    kw = dict(num_virtual_tokens=2, prompt_tuning_init="RANDOM", tokenizer_kwargs={"trust_remote_code": True})
    with pytest.raises(ValueError, match="tokenizer_kwargs only valid when using prompt_tuning_init='TEXT'."):
        PromptTuningConfig(**kw)
    assert PromptTuningConfig().is_prompt_learning and not LoraConfig().is_prompt_learning


def test_peft_type_and_version(monkeypatch):
    assert LoraConfig().peft_type == "LORA" and LoraConfig().to_dict()["peft_type"] == "LORA"
    with pytest.warns(UserWarning, match="replaced by 'LORA'"):
        assert LoraConfig(peft_type="PROMPT_TUNING").peft_type == smolpeft.PeftType.LORA
    monkeypatch.setattr(smolpeft.config, "__version__", "0.15.0.dev7")
    monkeypatch.setattr(smolpeft.config, "_get_commit_hash", lambda pkg: "abc123")
    assert LoraConfig().peft_version == "0.15.0.dev7@abc123"
    assert LoraConfig(peft_version="0.10").peft_version == "0.10"


def test_copy_deepcopy_pickle():
    config = LoraConfig(r=4, target_modules=["q"], rank_pattern={"q": 2})
    for twin in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert twin.to_dict() == config.to_dict()
