"""QLoRA: a 4-bit NF4 base (bitsandbytes) under fp32 LoRA adapters, and the ways back to full precision."""

from __future__ import annotations

import warnings

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def bnb_config(double_quant: bool = True, compute_dtype: torch.dtype = torch.float32):
    """transformers' BitsAndBytesConfig for NF4 weights; matmuls run in `compute_dtype`."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ImportError("4-bit loading needs bitsandbytes: pip install 'smolpeft[qlora]'") from e
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
    auto_clear_cache: bool = True,  # PEFT empties the accelerator cache here; nothing is cached on this path
) -> nn.Module:
    """Freeze the base, keep norms (and other small float params) in fp32, and let gradients reach the inputs
    (PEFT's name and arguments; checkpointing is on by default, as there).

    The unquantized tensors (embeddings, norms, head) are copied out of the loaded checkpoint: loaded zero-copy,
    they keep the whole memory-mapped file alive, and with it every page that was read to quantize the rest, so
    the process would hold the full-precision checkpoint next to its 4-bit copy."""
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
        elif p.dtype.is_floating_point:
            p.data = p.data.clone()
    if use_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {})
    model.enable_input_require_grads()
    return model


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit or Linear8bitLt (bitsandbytes is imported lazily, only where installed)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a layer as a dense float tensor: dequantized for bitsandbytes 4-bit and 8-bit layers."""
    w = layer.weight
    if type(w).__name__ == "Params4bit":
        import bitsandbytes.functional as F

        if getattr(w.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks weights for its CPU kernel on the first no-grad forward; undo it, as its
            # own state_dict() does, or dequantize_4bit reads the bytes in the wrong order.
            w.data, w.quant_state = F._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        return F.dequantize_4bit(w.data, w.quant_state)
    if type(w).__name__ == "Int8Params":
        import bitsandbytes.functional as F

        scale = layer.state.SCB if layer.state.SCB is not None else w.SCB  # row-wise absmax scales
        return F.int8_vectorwise_dequant(w.data, scale.to(w.device))
    return w.data


def set_dense_weight(layer: nn.Module, dense: torch.Tensor) -> None:
    """Store `dense` as the layer's weight, re-quantized for 4-bit and 8-bit layers (which adds rounding error)."""
    import bitsandbytes as bnb

    old = layer.weight
    dense = dense.detach().float().cpu()
    if type(old).__name__ == "Params4bit":
        warnings.warn(
            "merging into a 4-bit layer re-quantizes it: outputs shift by the NF4 rounding error; "
            "dequantize() first for an exact merge",
            stacklevel=4,
        )
        new = bnb.nn.Params4bit(
            dense,
            requires_grad=False,
            quant_type=old.quant_state.quant_type,
            compress_statistics=old.compress_statistics,
            blocksize=old.blocksize,
            module=layer,
        )
    elif type(old).__name__ == "Int8Params":
        warnings.warn(
            "merging into an 8-bit layer re-quantizes it: outputs shift by the int8 rounding error", stacklevel=4
        )
        new = bnb.nn.Int8Params(dense.to(torch.float16), requires_grad=False, has_fp16_weights=old.has_fp16_weights)
        layer.state.reset_grads()
        layer.state.SCB = None
    else:
        raise TypeError(f"{type(layer).__name__} is not a bitsandbytes quantized layer")
    layer.weight = new.to(old.device)
    if type(old).__name__ == "Int8Params":
        layer.state.SCB = layer.weight.SCB


def dequantize(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every Linear4bit (also inside LoRA wrappers) by an nn.Linear with its dequantized weight, in place."""
    for path, m in list(model.named_modules()):
        if type(m).__name__ == "Linear4bit":
            dense = nn.Linear(
                m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device, dtype=dtype
            )
            with torch.no_grad():
                dense.weight.copy_(dense_weight(m).to(dtype))
                if m.bias is not None:
                    dense.bias.copy_(m.bias.to(dtype))
            model.set_submodule(path, dense)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype and not getattr(p, "requires_grad", False):
            p.data = p.data.to(dtype)
    inner = getattr(model, "base_model", model)  # a PeftModel or the transformers model itself
    for obj in {id(x): x for x in (model, inner)}.values():
        cfg = getattr(obj, "config", None)
        if cfg is not None and hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        for attr, value in (("is_quantized", False), ("hf_quantizer", None), ("quantization_method", None)):
            if attr in getattr(obj, "__dict__", {}):
                setattr(obj, attr, value)
        if hasattr(obj, "is_loaded_in_4bit"):
            obj.is_loaded_in_4bit = False
    return model
