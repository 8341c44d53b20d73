"""Run configuration: the bundled YAML recipes, their keys (PEFT's field names) and the flags derived from
TrainConfig."""

import dataclasses
import pathlib

import pytest
import yaml

from smolpeft.cli import build_parser, train_config
from smolpeft.config import LoraConfig, PromptTuningConfig, TaskType
from smolpeft.train import ALIASES, TrainConfig

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "smolpeft" / "configs"

# Each bundled recipe and the README command line it stands for.
RECIPES = {
    "intent-lora": "--task intent --rank 16 --epochs 2",
    "chat-lora": "--model ./my-llama --data chat.jsonl --targets all-linear --max-steps 200",
    "chat-qlora": "--method qlora --model ./my-llama --data chat.jsonl",
    "prompt-tuning": "--method prompt --virtual-tokens 20 --prompt-init SAMPLE_VOCAB",
}


def _cfg(argv: str) -> TrainConfig:
    return train_config(build_parser().parse_args(["train", *argv.split()]))


def test_every_recipe_is_listed():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_equals_its_flags(name):
    assert _cfg(f"--config {name}") == _cfg(RECIPES[name])
    assert _cfg(f"--config {CONFIGS / name}.yaml") == _cfg(RECIPES[name])
    # recipes use TrainConfig's own names (PEFT's for the adapter), never the short aliases
    keys = set(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()))
    assert keys <= {f.name for f in dataclasses.fields(TrainConfig)} and not keys & set(ALIASES)


def test_adapter_fields_are_peft_fields_passed_through():
    cfg = _cfg("--rank 4 --alpha 3 --dropout 0.2 --targets q_proj,v_proj --rslora")
    lora = cfg.peft_config(TaskType.CAUSAL_LM, "base")
    assert isinstance(lora, LoraConfig)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules, lora.use_rslora) == (
        4,
        3,
        0.2,
        ["q_proj", "v_proj"],
        True,
    )
    assert (lora.task_type, lora.base_model_name_or_path) == ("CAUSAL_LM", "base")
    assert _cfg("--r 4").peft_config(TaskType.SEQ_CLS, "b").lora_alpha == 8  # default: 2 x r
    assert _cfg("--target-modules q_proj|v_proj").target_modules == "q_proj|v_proj"  # a regex stays a string
    prompt = _cfg("--method prompt --num-virtual-tokens 5 --prompt-init TEXT --prompt-init-text hi").peft_config(
        TaskType.SEQ_CLS, "base"
    )
    assert isinstance(prompt, PromptTuningConfig)
    assert (
        prompt.num_virtual_tokens,
        prompt.prompt_tuning_init,
        prompt.prompt_tuning_init_text,
        prompt.tokenizer_name_or_path,
    ) == (5, "TEXT", "hi", "base")


def test_short_names_are_keywords_too():
    assert TrainConfig(rank=4, alpha=2.0, targets="a,b", virtual_tokens=3) == TrainConfig(
        r=4, lora_alpha=2.0, target_modules=["a", "b"], num_virtual_tokens=3
    )
    assert dataclasses.replace(TrainConfig(r=4), r=16).r == 16


def test_every_field_has_a_flag_and_yaml_flags_override(tmp_path):
    parser = build_parser()
    train = next(a for a in parser._subparsers._actions if a.dest == "command").choices["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli", True):
            assert f"--{f.name.replace('_', '-')}" in flags, f.name
    assert {f"--{a.replace('_', '-')}" for a in ALIASES} <= flags
    run = tmp_path / "run.yaml"
    run.write_text("model: m\nrank: 4\nmax-steps: 7\nlr: 0.1\nlora_dropout: 0.3\n")
    c = _cfg(f"--config {run} --lr 0.5 --dropout 0.1")
    assert (c.model, c.r, c.max_steps, c.lr, c.lora_dropout) == ("m", 4, 7, 0.5, 0.1)
    run.write_text("rnak: 4\n")
    with pytest.raises(ValueError, match="unknown key 'rnak'"):
        _cfg(f"--config {run}")
    with pytest.raises(FileNotFoundError, match="neither a file nor a bundled recipe"):
        _cfg("--config no-such-recipe")
