"""PEFT's module path `peft.optimizers`: a thin re-export."""

from ..loraplus import create_loraplus_optimizer  # noqa: F401
