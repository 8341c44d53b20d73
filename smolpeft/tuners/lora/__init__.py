"""PEFT's module path `peft.tuners.lora`: thin re-exports."""

from ...config import LoraConfig  # noqa: F401
from ...tuner import LoraModel  # noqa: F401
from .layer import Embedding, Linear, LoraLayer  # noqa: F401
