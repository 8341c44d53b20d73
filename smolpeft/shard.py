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
from torch.distributed.fsdp import fully_shard  # noqa: F401  (imported with this module: see train's base_rss_mb)
from torch.distributed.tensor import DTensor


def skeleton(model_class: type[nn.Module], base: str, dtype: torch.dtype | None = None, **config_kw) -> nn.Module:
    """`model_class` (an Auto class) for the checkpoint in `base`, its parameters on the meta device: no bytes read."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(base, **config_kw)
    # from_pretrained's default dtype is the checkpoint's ("auto"); keep that, so both paths train the same numbers
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    with torch.device("meta"):
        return model_class.from_config(config, dtype=dtype)


def repeated_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks: the heaviest nn.ModuleList of more than one module (FSDP's shard units)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        raise ValueError("fsdp: found no repeated blocks (an nn.ModuleList of layers) to shard in this model")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def to_4bit(model: nn.Module, storage: torch.dtype = torch.float32) -> nn.Module:
    """Swap every nn.Linear of the (meta) decoder blocks for a meta bitsandbytes Linear4bit, as transformers'
    4-bit loading converts them (the head and embeddings stay in full precision). The packed NF4 bytes are stored as
    `storage` (bitsandbytes' quant_storage): FSDP shards and all-gathers them like any float tensor; `fill`
    quantizes each weight and keeps this rank's rows of the packed bytes."""
    import bitsandbytes as bnb

    for block in repeated_blocks(model):
        for path, m in list(block.named_modules()):
            if type(m) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(
                m.in_features,
                m.out_features,
                bias=m.bias is not None,
                compute_dtype=torch.float32,  # as qlora.bnb_config
                quant_type="nf4",
                quant_storage=storage,
                device="meta",
            )
            n = m.in_features * m.out_features
            # two 4-bit codes a byte, then viewed as `storage`: bitsandbytes' packed shape, (bytes / itemsize, 1)
            rows = (n + 1) // 2 // storage.itemsize
            q.weight = nn.Parameter(torch.empty(rows, 1, dtype=storage, device="meta"), requires_grad=False)
            # bitsandbytes repacks CPU weights in place for its inference kernel on the first no-grad forward; a
            # gathered FSDP copy is freed after use, so that layout would not stick (and the quant_state would lie)
            q.support_avx512bf16_for_cpu = False
            block.set_submodule(path, q)
    return model


# safetensors' dtype names (the header's "dtype" field)
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def weight_files(base: str) -> dict[str, str]:
    """Tensor name -> the safetensors file under `base` that holds it (one file or an index of several)."""
    index = os.path.join(base, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(base, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(base, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"sharded loading reads safetensors weights; {base} has no model.safetensors")
    return dict.fromkeys(read_header(single)[1], single)


def read_header(path: str) -> tuple[int, dict]:
    """(offset of the data, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file: 8 bytes of header
    length, then the JSON header, then each tensor's bytes, row-major."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def read_rows(path: str, data_at: int, entry: dict, start: int, out: torch.Tensor) -> None:
    """Read rows [start, start + len(out)) of one tensor into `out` with plain file reads. Rows are contiguous in the
    file, so this touches only those bytes; unlike a memory map, nothing of the file stays in this process's RSS
    (the page cache is the kernel's). A file of another dtype goes through a buffer of the rows only."""
    dtype = DTYPES[entry["dtype"]]
    shape = entry["shape"]
    if list(out.shape[1:]) != shape[1:] or start + (out.shape[0] if out.dim() else 1) > (shape[0] if shape else 1):
        raise ValueError(f"{path}: rows from {start} of {shape} do not fit a shard of shape {list(out.shape)}")
    row = math.prod(shape[1:]) * dtype.itemsize
    direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
    buf = out if direct else torch.empty(out.shape, dtype=dtype)
    view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
    with open(path, "rb", buffering=0) as f:
        f.seek(data_at + entry["data_offsets"][0] + start * row)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise ValueError(f"{path}: file ends inside tensor data")
            done += got
    if not direct:
        out.copy_(buf)


def pin_mmap_threshold(n_bytes: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of `n_bytes` or more with its own mmap, returned to the system on free.

    On CPU, FSDP all-gathers each block into fresh buffers and frees them after use. glibc's default raises its mmap
    threshold to the size of the largest buffer freed, so later blocks come from the heap and freed ones stay
    resident: measured here, a rank's RSS climbed by the whole base in one forward. A fixed threshold turns that
    off (as MALLOC_MMAP_THRESHOLD_ would). Returns False where libc has no mallopt (not glibc)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, n_bytes))  # -3: M_MMAP_THRESHOLD


def file_key(name: str) -> str:
    """The checkpoint's name of a parameter of the (possibly adapter-wrapped) model: LoRA wrappers add `base_layer`."""
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def fill(
    model: nn.Module,
    root: nn.Module,
    base: str,
    rank: int,
    world: int,
    device: str = "cpu",
) -> int:
    """Materialise the meta tensors of `model` (already under `root`'s `fully_shard`) on `device` and read this
    rank's rows of each from `base`'s safetensors files. Returns the base bytes this rank holds (4-bit: packed)."""
    # What is still on meta is the base; the adapters are real already. Non-persistent buffers (rotary inv_freq) are
    # not in the file: transformers' own _init_weights recomputes them, as from_pretrained does.
    meta = [(n, t) for n, t in model.named_parameters() if t.is_meta]
    persistent = [
        (n, b) for n, b in model.named_buffers() if b.is_meta and n.rsplit(".", 1)[-1] not in _transient(model, n)
    ]
    recompute = [m for m in model.modules() if any(b.is_meta for b in m.buffers(recurse=False))]
    if any(list(m.parameters(recurse=False)) for m in recompute):
        raise ValueError("sharded loading: a module holds both weights and computed buffers; load without --fsdp")
    # to_empty would also wipe the adapters and real buffers; this allocates only what is still on meta. FSDP2's
    # _apply re-pads each local shard afterwards, so to_local() below is a view of the storage FSDP all-gathers from.
    root._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    for m in recompute:
        model._init_weights(m)
    where = weight_files(base)
    headers = {path: read_header(path) for path in set(where.values())}

    def entry(name: str) -> tuple[str, int, dict]:
        key = file_key(name)
        if key not in where:
            raise KeyError(f"sharded loading: {base} has no tensor {key!r} (for the model's {name})")
        data_at, header = headers[where[key]]
        return where[key], data_at, header[key]

    n_bytes = 0
    for name, _ in meta:
        t = model.get_parameter(name)  # the sharded parameter that replaced the meta one
        if not isinstance(t, DTensor):
            raise ValueError(f"sharded loading: {name} is not sharded; fully_shard the model before fill")
        local, rows = t.to_local(), t.shape[0]
        start = min(rank * math.ceil(rows / world), rows)
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        path, data_at, e = entry(name)
        if type(owner).__name__ == "Linear4bit" and name.endswith("weight"):
            dense = torch.empty(e["shape"], dtype=DTYPES[e["dtype"]])
            read_rows(path, data_at, e, 0, dense)
            local.copy_(_quantize_rows(owner, dense, t, start, local.shape[0]))
            del dense
        else:
            read_rows(path, data_at, e, start, local)
        n_bytes += local.numel() * local.element_size()
    for (
        name,
        _,
    ) in persistent:  # buffers are not sharded: every rank reads them whole (they are small)
        b = model.get_buffer(name)
        read_rows(*entry(name), 0, b)
        n_bytes += b.numel() * b.element_size()
    return n_bytes


def _transient(model: nn.Module, name: str) -> set[str]:
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return parent._non_persistent_buffers_set


def _quantize_rows(layer: nn.Module, dense: torch.Tensor, packed: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """NF4-quantize one whole weight (every rank does, deterministically: the absmax statistics span the tensor, and
    double quantization spans all of them), keep the quant_state on the layer for bitsandbytes to find after each
    all-gather, and return rows [start, start + n) of the packed bytes."""
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(
        dense.to(packed.device),
        blocksize=64,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=packed.dtype,
    )
    if tuple(q.shape) != tuple(packed.shape):
        raise ValueError(f"4-bit sharded loading: packed shape {tuple(q.shape)}, expected {tuple(packed.shape)}")
    layer.quant_state = state
    return q[start : start + n]  # the whole q is dropped on return: a rank keeps one weight's bytes at a time
