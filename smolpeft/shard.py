"""Sharded loading for FSDP: build the base on the meta device, shard it, then read each rank's rows of every weight
straight from the safetensors files, so a rank never holds more of the base than its own shard.

The order is: `skeleton` (no weights read), adapters added (they are real tensors: lora.py builds them on the CPU
when the base is on meta), `fully_shard` (on meta, it only records the layout), then `fill`. FSDP2 shards every
tensor along dim 0 in `torch.chunk` pieces, so rank r owns rows [r·c, r·c + local) with c = ceil(rows / world).
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn


def skeleton(model_class, base: str, dtype: torch.dtype | None = None, **config_kw) -> nn.Module:
    """`model_class` (an Auto class) for the checkpoint in `base`, its parameters on the meta device: no bytes read."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(base, **config_kw)
    # from_pretrained's default dtype is the checkpoint's ("auto"); keep that, so both paths train the same numbers
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    with torch.device("meta"):
        return model_class.from_config(config, dtype=dtype)


def weight_files(base: str) -> dict[str, str]:
    """Tensor name -> the safetensors file under `base` that holds it (one file or an index of several)."""
    index = os.path.join(base, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(base, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(base, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"sharded loading reads safetensors weights; {base} has no model.safetensors")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def file_key(name: str) -> str:
    """The checkpoint's name of a parameter of the (possibly adapter-wrapped) model: LoRA wrappers add `base_layer`."""
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def fill(model: nn.Module, root: nn.Module, base: str, rank: int, world: int, device: str = "cpu") -> int:
    """Materialise the meta tensors of `model` (already under `root`'s `fully_shard`) on `device` and read this
    rank's rows of each from `base`'s safetensors files. Returns the number of base bytes this rank read."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    # What is still on meta is the base; the adapters are real already. Non-persistent buffers (rotary inv_freq) are
    # not in the file: transformers' own _init_weights recomputes them, as from_pretrained does.
    meta = [(n, t) for n, t in model.named_parameters() if t.is_meta]
    persistent = [(n, b) for n, b in model.named_buffers() if b.is_meta and n.rsplit(".", 1)[-1] not in _transient(model, n)]
    recompute = [m for m in model.modules() if any(b.is_meta for b in m.buffers(recurse=False))]
    if any(list(m.parameters(recurse=False)) for m in recompute):
        raise ValueError("sharded loading: a module holds both weights and computed buffers; load without --fsdp")
    # to_empty would also wipe the adapters and real buffers; this allocates only what is still on meta. FSDP2's
    # _apply re-pads each local shard afterwards, so to_local() below is a view of the storage FSDP all-gathers from.
    root._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    for m in recompute:
        model._init_weights(m)
    where = weight_files(base)
    handles: dict[str, object] = {}

    def read(name: str):
        key = file_key(name)
        if key not in where:
            raise KeyError(f"sharded loading: {base} has no tensor {key!r} (for the model's {name})")
        if where[key] not in handles:
            handles[where[key]] = safe_open(where[key], "pt")  # memory-mapped: get_slice reads only its rows
        return handles[where[key]].get_slice(key)

    n_bytes = 0
    for name, _ in meta:
        t = model.get_parameter(name)  # the sharded parameter that replaced the meta one
        if not isinstance(t, DTensor):
            raise ValueError(f"sharded loading: {name} is not sharded; fully_shard the model before fill")
        local, rows = t.to_local(), t.shape[0]
        start = min(rank * math.ceil(rows / world), rows)
        part = read(name)[start : start + local.shape[0]]
        if tuple(part.shape) != tuple(local.shape):
            raise ValueError(f"sharded loading: {name} rows from {start} have shape {tuple(part.shape)}, shard {local.shape}")
        local.copy_(part)
        n_bytes += part.numel() * part.element_size()
    for name, _ in persistent:  # buffers are not sharded: every rank reads them whole (they are small)
        b = model.get_buffer(name)
        b.copy_(read(name)[:])
        n_bytes += b.numel() * b.element_size()
    return n_bytes


def _transient(model: nn.Module, name: str) -> set[str]:
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return parent._non_persistent_buffers_set
