"""PEFT's module path `peft.tuners.lora.conversion`: thin re-exports."""

from ...convert import convert_to_lora, save_as_lora  # noqa: F401
