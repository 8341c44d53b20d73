"""QLoRA: a 4-bit NF4 base (bitsandbytes) under fp32 LoRA adapters."""

from __future__ import annotations

import torch
from torch import nn


def bnb_config(double_quant: bool = True, compute_dtype: torch.dtype = torch.float32):
    """transformers' BitsAndBytesConfig for NF4 weights; matmuls run in `compute_dtype`."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ImportError("--method qlora needs bitsandbytes: pip install 'smolpeft[qlora]'") from e
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype
    )


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """Freeze the base, keep norms (and other small float params) in fp32, and let gradients reach the inputs."""
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def merge_4bit(layer: nn.Module, delta: torch.Tensor) -> None:
    """W ← quantize(dequantize(W) + ΔW): re-quantizing adds NF4 rounding error, so prefer merging into a float copy."""
    import bitsandbytes as bnb

    w = layer.weight
    dense = bnb.functional.dequantize_4bit(w.data, w.quant_state).float() + delta.float()
    new = bnb.nn.Params4bit(
        dense.to("cpu"), requires_grad=False, quant_type=w.quant_state.quant_type,
        compress_statistics=w.compress_statistics, blocksize=w.blocksize,
    )
    layer.weight = new.to(w.device)
