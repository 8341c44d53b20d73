"""CorDA (context-oriented decomposition adaptation, arxiv.org/abs/2406.05223): the data step before
`get_peft_model(model, LoraConfig(init_lora_weights="corda", ...))`.

For each target layer with weight W (out×in), inputs X from sample data give the covariance C = Σ XᵀX / n. The
SVD of W·C = U S Vhᵀ orders W's directions by how much the data uses them; with V = (Vh C⁻¹)ᵀ, U S Vᵀ = W exactly.
The adapter then starts as r of those components (A₀ = √(S/s)·Vᵀ, B₀ = U·√(S/s): `LoraLayer.corda_factors`) and the
base keeps the rest, W - U_r S_r V_rᵀ:
  - "ipm" (instruction-previewed mode) takes the r largest components: fine-tuning starts from what the task uses;
  - "kpm" (knowledge-preserved mode) takes the r smallest, leaving the components the data relies on in the base.
`preprocess_corda` leaves `eigens` (U r-columns, S, V r-columns) on each target layer; the LoRA init reads and drops it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import LoraConfig
from .lora import pattern_value, resolve_targets


@dataclass
class CordaEigens:
    """One layer's CorDA decomposition, cropped to its rank r: W·C ≈ U diag(S) Vhᵀ, V = (Vh C⁻¹)ᵀ."""

    S_WC: torch.Tensor  # r
    U_WC: torch.Tensor  # out×r
    V_WC: torch.Tensor  # in×r


def _targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The layers `config` targets that CorDA handles (Linear and GPT-2's Conv1D), named as in `model`."""
    return [
        (name, m)
        for name in resolve_targets(model, config)
        if isinstance(m := model.get_submodule(name), (nn.Linear, Conv1D))
    ]


def _out_in_weight(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.data.float()
    return w.T if isinstance(layer, Conv1D) else w  # Conv1D stores Wᵀ


def _read(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A safetensors file written by preprocess_corda. PEFT writes these caches with torch.save (a pickle); smolpeft
    never unpickles a file, so such a cache is refused, not read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"CorDA {what} {os.fspath(path)!r} is not a safetensors file written by smolpeft's preprocess_corda "
            f"(PEFT's pickled caches are not read: delete it to rebuild): {e}"
        ) from e


def _write(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)


def _check_keys(saved: dict, keys: list[str], path: str | os.PathLike) -> None:
    missing = [k for k in keys if k not in saved]
    if missing:
        raise ValueError(
            f"CorDA cache {os.fspath(path)!r} has no entry {missing[0]!r} ({len(missing)} of this model's target "
            "layers missing): it was built for another model or other target_modules"
        )


def _usable(path: str | os.PathLike | None) -> bool:
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: LoraConfig,
    run_model: Callable[[], object] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """Set `eigens` on every target layer of `model`, as PEFT's `preprocess_corda`.

    run_model: runs the model over sample data (the covariance is collected by forward hooks during this call);
    not needed when `corda_config.cache_file` or `covariance_file` already holds the result.
    hooked_model: collect the covariance on this model instead (same layer names), e.g. an unquantized copy.
    """
    cfg = lora_config.corda_config
    if cfg is None:
        raise ValueError("preprocess_corda needs lora_config.corda_config (a CordaConfig)")
    targets = _targets(model, lora_config)
    if _usable(cfg.cache_file):
        cache = _read(cfg.cache_file, "cache_file")
        _check_keys(cache, [f"{n}.eigens.S_WC" for n, _ in targets], cfg.cache_file)
        for name, layer in targets:
            w = layer.weight
            layer.eigens = CordaEigens(
                **{k: cache[f"{name}.eigens.{k}"].to(w.device) for k in ("S_WC", "U_WC", "V_WC")}
            )
        return
    if cfg.corda_method is None:
        raise ValueError("corda_method is required when cache_file is not provided.")
    _collect_covariance(model, lora_config, targets, run_model, hooked_model)
    steps = targets
    if cfg.verbose:  # one progress line over the layers' SVDs, as PEFT shows
        from tqdm.auto import tqdm

        steps = tqdm(targets, desc="Collecting eigens")
    for name, layer in steps:
        r = pattern_value(name, lora_config.rank_pattern, lora_config.r)
        layer.eigens = _decompose(layer, r, cfg.corda_method)
    if cfg.prune_temporary_fields:
        for _, layer in targets:
            for attr in ("sample_count", "covariance_matrix"):
                if hasattr(layer, attr):
                    delattr(layer, attr)
    if cfg.cache_file is not None:
        cache = {
            f"{name}.eigens.{k}": getattr(layer.eigens, k) for name, layer in targets for k in ("S_WC", "U_WC", "V_WC")
        }
        _write(cache, cfg.cache_file)


def _collect_covariance(model, config, targets, run_model, hooked_model) -> None:
    """covariance_matrix = Σ x̂ᵀx̂ / sample_count on each target layer, with x̂ = a forward call's inputs (tokens as
    rows) divided by |max x| as PEFT scales them; or read from `covariance_file`."""
    cfg = config.corda_config
    if _usable(cfg.covariance_file):
        saved = _read(cfg.covariance_file, "covariance_file")
        _check_keys(saved, [n for n, _ in targets], cfg.covariance_file)
        for name, layer in targets:
            layer.covariance_matrix = saved[name].to(layer.weight.device)
        return
    if run_model is None:
        raise ValueError("run_model must be specified when covariance file and cache file aren't built.")
    hooked = model if hooked_model is None else hooked_model
    hooked.eval()

    def hook(layer, args, output):
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1])  # every token of every row is one sample of the layer's input
        if not cfg.use_float16_for_covariance:
            x = x.float()
        x = x / torch.max(x).abs()
        if not torch.isfinite(x).all():
            raise ValueError("Invalid value found in input, please check your input data.")
        cov = x.T @ x
        if not torch.isfinite(cov).all():
            raise ValueError("Invalid value found in covariance (CorDA's input statistics overflowed).")
        layer.sample_count += 1
        layer.covariance_matrix = layer.covariance_matrix + cov

    hooked_targets = targets if hooked is model else _targets(hooked, config)
    handles = []
    for _, layer in hooked_targets:
        layer.sample_count, layer.covariance_matrix = 0, 0
        handles.append(layer.register_forward_hook(hook))
    try:
        run_model()
    finally:
        for h in handles:
            h.remove()
    if hooked is not model:  # layers only the hooked model runs are skipped, as in PEFT
        ours = dict(targets)
        for name, layer in hooked_targets:
            if name in ours:
                ours[name].sample_count, ours[name].covariance_matrix = layer.sample_count, layer.covariance_matrix
    for name, layer in targets:
        if not getattr(layer, "sample_count", 0):
            raise ValueError(f"CorDA: run_model never ran target layer {name!r}, so it has no input statistics")
        layer.covariance_matrix = layer.covariance_matrix / layer.sample_count
    if cfg.covariance_file is not None:
        _write({name: layer.covariance_matrix for name, layer in targets}, cfg.covariance_file)


def _decompose(layer: nn.Module, r: int, method: str) -> CordaEigens:
    """SVD of W·C (C damped until it inverts cleanly), cropped to the r largest ("ipm") or smallest ("kpm")."""
    W = _out_in_weight(layer)
    if not hasattr(layer, "covariance_matrix"):
        raise ValueError("Covariance matrix not found in linear module: call `preprocess_corda`, not this function.")
    C = layer.covariance_matrix.float()
    eye = torch.eye(C.shape[0], device=C.device)
    # A covariance from few or repetitive samples is near singular: add damp·mean(diag C)·I, doubling damp until
    # C·C⁻¹ is within 0.05 of the identity (PEFT's rule and constants).
    damp = 0.01
    while True:
        Cd = C + eye * torch.diag(C).mean() * damp
        C_inv = torch.linalg.inv(Cd)
        if torch.dist(Cd @ C_inv, eye).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(W @ Cd, full_matrices=False)
    V = (Vh @ C_inv).T  # in×min(in, out): U diag(S) Vᵀ = W
    keep = slice(None, r) if method == "ipm" else slice(-r, None)
    return CordaEigens(S_WC=S[keep].clone(), U_WC=U[:, keep].clone(), V_WC=V[:, keep].clone())
