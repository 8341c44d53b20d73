"""`convert_to_lora` / `save_as_lora`: an adapter's ΔW per layer, re-factored by truncated SVD into a plain LoRA.

PEFT uses this to turn other additive methods into LoRA; smolpeft's only such method is LoRA, so here it re-ranks a
LoRA adapter (a smaller rank, or per-layer ranks chosen by explained energy). For each layer
    ΔW = s·B A = U S Vᵀ  ->  A' = Vᵀ[:k],  B' = U[:, :k] S[:k],  scaling 1 (r = lora_alpha = k),
so B' A' is the best rank-k approximation of ΔW.
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
from transformers.pytorch_utils import Conv1D

from . import checkpoint
from .config import LoraConfig, PeftType
from .lora import LoraLayer, ModulesToSave

_PREFIX = "base_model.model."


def _energy_rank(S: torch.Tensor, threshold: float) -> int:
    """The smallest k whose top-k singular values hold at least `threshold` of Σ S² (S sorted, descending)."""
    cs = torch.cumsum(S**2, dim=0)
    return int(torch.searchsorted(cs, threshold * cs[-1]).item()) + 1


@torch.no_grad()
def _convert_layer(layer: LoraLayer, rank: int | float, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A', B', k) of one layer's adapter `name`, in the adapter's dtype."""
    delta = layer.get_delta_weight(name)  # laid out like the base weight: in×out for Conv1D
    dtype = delta.dtype
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # no SVD in half precision
    k = rank if isinstance(rank, int) else _energy_rank(S, rank)
    if k > U.shape[1]:
        raise ValueError(
            f"The chosen rank {k} is larger than the weight shape ({U.shape[1]}), please choose a lower rank."
        )
    B, A = (U[:, :k] * S[:k]).to(dtype), Vh[:k].to(dtype)
    if isinstance(layer.base_layer, Conv1D):  # ΔWᵀ = B A  ->  ΔW = Aᵀ Bᵀ: the factors swap and transpose
        return B.T.contiguous(), A.T.contiguous(), k
    return A.contiguous(), B.contiguous(), k


def convert_to_lora(
    model: torch.nn.Module,
    rank: int | float,
    adapter_name: str = "default",
    progressbar: bool = False,
    compile_kwargs: dict | None = None,
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig, state dict under PEFT's file keys) of a LoRA that approximates adapter `adapter_name` of `model`.
    rank: an int, or a float in (0, 1] read as the share of ΔW's energy to keep (per-layer ranks in rank_pattern).
    compile_kwargs: torch.compile the per-layer conversion with these arguments."""
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(
            f"If rank is a float, it is interpreted as a threshold. It must be between 0 and 1 but got {rank}."
        )
    if rank == 0:
        raise ValueError("Passing a rank of 0 doesn't make sense, please pass a valid value.")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.r]
    unsupported = sorted(
        {
            "Embedding (LoRA on an nn.Embedding)" if m.is_embedding else "DoRA (use_dora=True)"
            for _, m in layers
            if m.is_embedding or m.use_dora[adapter_name]
        }
    )
    if unsupported:
        raise TypeError(f"Some module types on this model do not support LoRA conversion: {', '.join(unsupported)}.")
    if not layers:
        raise TypeError("Could not detect any layer that supports LoRA conversion.")
    peft_config = getattr(model, "peft_config", {}).get(adapter_name)
    if peft_config is not None and peft_config.peft_type == PeftType.LORA:
        warnings.warn(
            "Converting a PEFT adapter to LoRA that is already a LoRA adapter. There is typically no need for that.",
            stacklevel=2,
        )
    if getattr(peft_config, "bias", "none") != "none" or any(m.lora_bias[adapter_name] for _, m in layers):
        bias = getattr(peft_config, "bias", "none")
        raise ValueError(f"The adapter's config sets bias={bias} (or lora_bias=True), this is not supported right now.")

    kwargs = dict(rank_pattern={}, alpha_pattern={}, exclude_modules=[])
    fixed = isinstance(rank, int)
    if peft_config is not None:
        kwargs |= dict(
            target_modules=copy.copy(peft_config.target_modules),
            base_model_name_or_path=peft_config.base_model_name_or_path,
            layers_pattern=peft_config.layers_pattern,
            layers_to_transform=peft_config.layers_to_transform,
        )
    else:  # no config to start from: the converted layers are the targets
        kwargs["target_modules"] = []
    # r = lora_alpha: the scaling is 1, since B' A' already is ΔW (with a float rank, the patterns set both per layer)
    config = LoraConfig(r=rank if fixed else 1, lora_alpha=rank if fixed else 1, **kwargs)
    convert = torch.compile(_convert_layer, **compile_kwargs) if compile_kwargs is not None else _convert_layer
    if progressbar:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="Converting to LoRA")
    state_dict = {}
    for name, layer in layers:
        A, B, k = convert(layer, rank=rank, name=adapter_name)
        short = name.removeprefix(_PREFIX)
        regex = isinstance(config.target_modules, str)
        if k != rank or regex:  # a regex cannot take one more name
            config.rank_pattern[short] = config.alpha_pattern[short] = k
        if not regex and (k == rank or peft_config is None) and short not in config.target_modules:
            config.target_modules = sorted([*config.target_modules, short])
        state_dict[f"{name}.lora_A.weight"], state_dict[f"{name}.lora_B.weight"] = A, B
    if peft_config is not None and peft_config.modules_to_save:
        config.modules_to_save = copy.copy(peft_config.modules_to_save)
        for path, m in model.named_modules():
            if isinstance(m, ModulesToSave) and adapter_name in m.modules_to_save:
                for pname, p in m.modules_to_save[adapter_name].named_parameters():
                    state_dict[f"{path}.{pname}"] = p.data
    return config, state_dict


def save_as_lora(
    path: str | os.PathLike,
    model: torch.nn.Module,
    rank: int | float,
    adapter_name: str = "default",
    progressbar: bool = False,
    compile_kwargs: dict | None = None,
) -> None:
    """`convert_to_lora`, written to `path` as an adapter directory that PeftModel.from_pretrained loads."""
    config, state_dict = convert_to_lora(model, rank, adapter_name, progressbar, compile_kwargs)
    os.makedirs(path, exist_ok=True)
    checkpoint.save_weights(state_dict, path)
    config.save_pretrained(path)
