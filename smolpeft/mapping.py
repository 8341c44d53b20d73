"""PEFT's module paths `peft.mapping` / `peft.mapping_func`: thin re-exports."""

from .model import get_peft_model  # noqa: F401
from .tuner import inject_adapter_in_model  # noqa: F401
