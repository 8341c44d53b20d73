"""PEFT's module path `peft.tuners.lora.corda`."""

from ...corda import CordaEigens, preprocess_corda  # noqa: F401
