"""PEFT's on-disk adapter format: key names, safe reading, atomic writing."""

from __future__ import annotations

import os
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from .config import WEIGHTS_NAME
from .lora import LoraLayer, ModulesToSave

BIN_NAME = "adapter_model.bin"


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, then rename: readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def adapter_params(model: nn.Module, name: str, prompt: nn.Parameter | None = None) -> dict[str, torch.Tensor]:
    """PEFT file key -> live tensor for adapter `name` (the adapter name itself never appears in a key).

    LoRA keys sit under `base_model.model.`, prompt tuning's head weights under `base_model.`, because PEFT wraps
    the transformers model once more (in a LoraModel) for LoRA only.
    """
    prefix = "base_model." if prompt is not None else "base_model.model."
    out: dict[str, torch.Tensor] = {}
    if prompt is not None:
        out["prompt_embeddings"] = prompt
    for path, m in model.named_modules():
        if isinstance(m, LoraLayer) and name in m.lora_A:
            a, b = ("lora_embedding_A", "lora_embedding_B") if m.is_embedding else ("lora_A.weight", "lora_B.weight")
            out[f"{prefix}{path}.{a}"] = m.lora_A[name]
            out[f"{prefix}{path}.{b}"] = m.lora_B[name]
        elif isinstance(m, ModulesToSave) and name in m.modules_to_save:
            for k, v in m.modules_to_save[name].state_dict(keep_vars=True).items():
                out[f"{prefix}{path}.{k}"] = v  # saved under the module's own path, as if it were not wrapped
    return out


def embedding_base_params(model: nn.Module, config, prompt: bool = False) -> dict[str, torch.Tensor]:
    """Base weights of LoRA-wrapped input/output embeddings, which PEFT also saves when `target_modules` names
    embed_tokens or lm_head (its test is a substring test, so a regex counts too): we write the same file."""
    targets = getattr(config, "target_modules", None) or []
    if not any(k in targets for k in ("embed_tokens", "lm_head")):
        return {}
    prefix = "base_model." if prompt else "base_model.model."
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    return {
        f"{prefix}{path}.base_layer.weight": m.base_layer.weight
        for path, m in model.named_modules()
        if isinstance(m, LoraLayer) and any(m is layer for layer in layers)
    }


def save_weights(tensors: dict[str, torch.Tensor], directory: str | os.PathLike) -> None:
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(os.path.join(directory, WEIGHTS_NAME), save_safetensors_bytes(data, metadata={"format": "pt"}))


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read adapter weights: safetensors, or a legacy .bin through torch.load(weights_only=True), never pickle."""
    st, binpath = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, BIN_NAME)
    if os.path.isfile(st):
        with open(st, "rb") as f:
            raw = f.read()
        try:
            return load_safetensors_bytes(raw)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise ValueError(f"{st} is not a valid safetensors file (truncated or corrupt?): {e}") from e
    if os.path.isfile(binpath):
        try:
            return torch.load(binpath, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{binpath} could not be read as a weights-only torch file: {e}") from e
    raise FileNotFoundError(f"no adapter weights in {directory}: expected {WEIGHTS_NAME}")


def copy_into(params: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], source: str) -> None:
    """Check names and shapes of every key first, then copy: a bad file leaves the model untouched."""
    missing = sorted(set(params) - set(loaded))
    unexpected = sorted(set(loaded) - set(params))
    if unexpected:
        raise KeyError(
            f"{source}: {len(unexpected)} keys match no adapter layer of this model, e.g. {unexpected[0]!r} "
            "(an adapter for another architecture?)"
        )
    if missing:
        raise KeyError(f"{source}: {len(missing)} adapter weights are missing, e.g. {missing[0]!r}")
    for k, p in params.items():
        if loaded[k].shape != p.shape:
            raise ValueError(f"{source}: key {k!r} has shape {tuple(loaded[k].shape)}, the model expects {tuple(p.shape)}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(loaded[k])
