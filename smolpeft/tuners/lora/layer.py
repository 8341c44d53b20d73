"""PEFT's module path `peft.tuners.lora.layer`. smolpeft has one LoRA layer class for every base; PEFT's per-base
class names answer isinstance() by the wrapped base layer's type."""

from torch import nn

from ...lora import LoraLayer


class _ByBase(type):
    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, LoraLayer) and isinstance(obj.base_layer, nn.Embedding) == cls.embedding


class Linear(metaclass=_ByBase):
    """isinstance(layer, Linear): a LoRA layer over a Linear, Conv1D or quantized linear base."""

    embedding = False


class Embedding(metaclass=_ByBase):
    """isinstance(layer, Embedding): a LoRA layer over an nn.Embedding."""

    embedding = True
