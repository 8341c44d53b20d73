"""PEFT's module path `peft.tuners.lora.model`."""

from ...tuner import LoraModel  # noqa: F401
