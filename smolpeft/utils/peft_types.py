"""PEFT's module path `peft.utils.peft_types`."""

from ..config import PeftType, TaskType  # noqa: F401
