"""PEFT's module path `peft.mapping_func`: a thin re-export."""

from .model import get_peft_model  # noqa: F401
