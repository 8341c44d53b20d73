"""target_parameters: accepted where PEFT's checks make it a no-op (same errors and warnings as peft), refused
with the field named where it would put LoRA on an nn.Parameter, which smolpeft does not implement."""

import re

import peft
import pytest
import tiny
from torch import nn

import smolpeft


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)


@pytest.mark.parametrize("target_modules", [None, [], ""])
def test_nothing_targeted_raises_as_peft(target_modules):
    msg = re.escape("No `target_modules` passed but also no `target_parameters` found.")
    for lib in (peft, smolpeft):
        with pytest.raises(ValueError, match=msg):
            lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=target_modules, target_parameters=["foo.weight"]))


def test_unmatched_parameters_warn_as_peft():
    msg = re.escape("target_parameters=['foobar.weight'] were set but no parameter was matched.")
    for lib in (peft, smolpeft):
        with pytest.warns(RuntimeWarning, match=msg):
            lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["linear"], target_parameters=["foobar.weight"]))
    with pytest.raises(TypeError, match="must be a list of strings or None"):
        smolpeft.LoraConfig(target_parameters="linear.weight")


def test_matched_parameter_is_refused_and_the_model_left_alone():
    model = tiny.llama()
    config = smolpeft.LoraConfig(target_modules=[], target_parameters=["q_proj.weight"])
    with pytest.raises(ValueError, match=r"target_parameters=\['q_proj.weight'\] matches .* not supported"):
        smolpeft.get_peft_model(model, config)
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_parameter_of_a_targeted_module_raises_as_peft():
    msg = "Trying to wrap an `nn.Parameter` of layer 'linear' of type Linear, which is not a valid target."
    for lib in (peft, smolpeft):
        with pytest.raises(ValueError, match=re.escape(msg)):
            lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["linear"], target_parameters=["linear.weight"]))
