"""Hot-swapping: replace a loaded LoRA adapter's weights in place with another adapter's (PEFT's `peft.utils.hotswap`).

The swap writes into the tensors the model already holds, so a `torch.compile`d model keeps its graph. What a compiled
graph cannot absorb is a change of shape or of a Python float, so `prepare_model_for_compiled_hotswap` (called before
compiling) turns every scaling s = alpha/r into a tensor and zero-pads every A (r×in) and B (out×r) to a common rank:
padded rows of A and columns of B are zero, so B A x is unchanged.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from operator import attrgetter
from typing import Literal

import torch
from torch import nn

from . import checkpoint
from .config import CONFIG_NAME, LoraConfig, PeftConfig, PeftType, load_config
from .lora import LoraLayer, pattern_value

# config fields that change the output beyond what the weights hold; two adapters must agree on them to swap
CONFIG_KEYS_TO_CHECK = {PeftType.LORA: ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}

_ADAPTER_KEY = re.compile(r"^(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)\.")


def _lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _pad_linear(old: nn.Linear, rank: int, is_A: bool) -> nn.Linear:
    """A copy of lora_A (r×in) or lora_B (out×r) zero-padded to `rank`; `old` itself if it has that rank already."""
    w = old.weight
    have = w.shape[0] if is_A else w.shape[1]
    if have == rank:
        return old
    if have > rank:
        raise ValueError(
            f"Trying to pad the adapter to the target rank {rank}, but the original rank is larger ({have}). "
            "This is not possible."
        )
    shape = (rank, w.shape[1]) if is_A else (w.shape[0], rank)
    new = nn.Linear(shape[1], shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: w.shape[0], : w.shape[1]] = w
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.weight.requires_grad_(w.requires_grad)
    if old.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    return new


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: LoraConfig | dict[str, LoraConfig] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Make later hot-swaps possible without recompiling: scalings become tensors and, with `target_rank` (the
    largest rank of the adapters to come), every LoRA A/B is zero-padded to it (the output does not change). Call it
    after loading the first adapter and before `torch.compile`. With `config`, its r and rank_pattern are set to
    `target_rank`."""
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", False):
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn(
                "prepare_model_for_compiled_hotswap was called with a model that is already compiled. This will likely "
                "result in re-compilation, hurting performance. Call the function before compiling the model.",
                stacklevel=2,
            )
        elif check_compiled != "ignore":
            raise ValueError(
                f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead."
            )
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(
            "No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` after loading "
            "the first adapter and before loading the second adapter."
        )
    for layer in layers:
        for name, s in layer.scaling.items():
            if not isinstance(s, torch.Tensor):  # a float in the graph is a guard: a new value would recompile
                layer.scaling[name] = torch.tensor(s, device=layer.weight.device)
        if target_rank is not None:
            # Linear-type layers only, as in PEFT (an Embedding's factors keep their rank)
            for name in list(layer.lora_A):
                layer.lora_A[name] = _pad_linear(layer.lora_A[name], target_rank, is_A=True)
                layer.lora_B[name] = _pad_linear(layer.lora_B[name], target_rank, is_A=False)
    if not config or target_rank is None:
        return
    for c in config.values() if isinstance(config, dict) else [config]:
        c.r = target_rank
        c.rank_pattern = dict.fromkeys(c.rank_pattern, target_rank)


def check_hotswap_configs_compatible(config0: PeftConfig, config1: PeftConfig) -> None:
    """Raise if `config1`'s adapter cannot replace `config0`'s by a weight swap (other method, or a field that changes
    the math differs)."""
    t0, t1 = PeftType(config0.peft_type), PeftType(config1.peft_type)
    _check_types(t0.value, t1.value)
    d0, d1 = config0.to_dict(), config1.to_dict()
    missing = object()
    for key in CONFIG_KEYS_TO_CHECK[t0]:
        v0, v1 = d0.get(key, missing), d1.get(key, missing)
        if v0 != v1:
            raise ValueError(f"Configs are incompatible: for {key}, {v0} != {v1}")


def _check_types(t0: str, t1: str) -> None:
    if t0 != t1:
        raise ValueError(f"Incompatible PEFT types found: {t0} and {t1}")
    if t0 not in {t.value for t in CONFIG_KEYS_TO_CHECK}:
        supported = ", ".join(t.value for t in CONFIG_KEYS_TO_CHECK)
        raise ValueError(f"Hotswapping only supports {supported} but {t0} was passed.")


def _insert_adapter_name(state_dict: dict[str, torch.Tensor], adapter_name: str, prefix: str) -> dict:
    """File keys -> model keys: `x.lora_A.weight` -> `x.lora_A.<name>.weight`, `x.lora_embedding_A` ->
    `x.lora_embedding_A.<name>`; keys without the prefix (modules_to_save) stay as they are."""
    out = {}
    for key, value in state_dict.items():
        if prefix in key:
            head, _, tail = key.rpartition(prefix)
            part, dot, rest = tail.partition(".")
            key = f"{head}{prefix}{part}.{adapter_name}{dot}{rest}" if dot else f"{key}.{adapter_name}"
        out[key] = value
    return out


def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: LoraConfig,
    parameter_prefix: str = "lora_",
) -> None:
    """Copy `state_dict` (model keys, adapter name inserted) into adapter `adapter_name` in place, and set each
    layer's scaling from `config`. The new adapter may target fewer layers (the others are zeroed) but not more.
    A smaller rank is written into the leading rows/columns of zeroed (padded) tensors; a larger one replaces the
    tensor's data (which a compiled model will not survive: pad with prepare_model_for_compiled_hotswap)."""
    if any(adapter_name in m.merged_adapters for m in _lora_layers(model)):
        raise ValueError(
            f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base weights. "
            "Please unmerge the adapter first by calling `peft_model.unmerge_adapter()`; unmerging after a swap of "
            "merged weights would otherwise corrupt them."
        )
    own = {
        k
        for k in (k.removeprefix("_orig_mod.") for k in model.state_dict())
        if parameter_prefix in k and (f".{adapter_name}." in k or k.endswith(f".{adapter_name}"))
    }
    unexpected = []
    for key in state_dict:  # dry run first: nothing changes unless every key has a home
        try:
            attrgetter(key)(model)
        except AttributeError:
            unexpected.append(key)
    if unexpected:
        raise RuntimeError(f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected)}.")
    touched: set[LoraLayer] = set()
    with torch.no_grad():
        for key in own - set(state_dict):  # layers the new adapter does not target contribute nothing
            attrgetter(key)(model).zero_()
            touched.add(_owner(model, key))
        for key, new in state_dict.items():
            layer = _owner(model, key)
            if layer is not None:
                _set_scaling(layer, adapter_name, _ADAPTER_KEY.match(key).group(1), config)
                touched.add(layer)
            old = attrgetter(key)(model)
            _write(old, new.to(old.device), key)
    for layer in touched - {None}:
        # cached stacks and norms are keyed on tensor identity and version; scalings changed in place are not seen
        layer._stacked, layer._norms = (None, None, None), {}


def _owner(model: nn.Module, key: str) -> LoraLayer | None:
    m = _ADAPTER_KEY.match(key)
    layer = getattr(model, "_orig_mod", model).get_submodule(m.group(1)) if m else None
    return layer if isinstance(layer, LoraLayer) else None


def _set_scaling(layer: LoraLayer, name: str, path: str, config: LoraConfig) -> None:
    """s = alpha/r (alpha/√r with rsLoRA) from the new config, rank_pattern and alpha_pattern matched against the
    layer's path; a tensor scaling is filled in place (no recompile)."""
    r = pattern_value(path, config.rank_pattern, config.r)
    alpha = pattern_value(path, config.alpha_pattern, config.lora_alpha)
    s = config.scaling(r, alpha)
    old = layer.scaling[name]
    if isinstance(old, torch.Tensor):
        old.fill_(s)
    elif isinstance(old, (float, int)):
        layer.scaling[name] = s
    else:
        raise TypeError(f"expected the scaling of adapter {name!r} to be a float or a tensor, got {type(old)}")
    layer.r[name], layer.lora_alpha[name] = r, alpha


def _write(old: torch.Tensor, new: torch.Tensor, key: str) -> None:
    """Same shape: copy. Smaller rank: zero, then fill the leading rows (A) or columns (B). Larger: new data."""
    if old.shape == new.shape:
        old.copy_(new)
    elif all(o >= n for o, n in zip(old.shape, new.shape)):
        if old.dim() != 2:
            raise NotImplementedError(f"cannot hot-swap {key}: a {old.dim()}-d weight of another rank")
        old.zero_()
        old[: new.shape[0], : new.shape[1]].copy_(new)
    else:
        old.data = new.to(old.dtype)


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str | os.PathLike,
    adapter_name: str,
    torch_device: str | None = None,
    **kwargs,
) -> None:
    """Replace the weights of loaded adapter `adapter_name` with those of the adapter saved at `model_name_or_path`;
    the name stays. Raises if the two adapters are not compatible (other method, alphas pattern, dropout, rsLoRA,
    DoRA, or layers the loaded adapter does not have)."""
    path = checkpoint.resolve_dir(model_name_or_path, **kwargs)
    with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
        their_type = json.load(f).get("peft_type")
    active = model.active_peft_config
    # the type is checked before the config is built: smolpeft cannot build another method's config
    _check_types(PeftType(active.peft_type).value, str(their_type))
    config = load_config(path)
    check_hotswap_configs_compatible(active, config)
    weights = checkpoint.read_weights(path, device=torch_device or "cpu")
    state_dict = _insert_adapter_name(weights, adapter_name, "lora_")
    hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config, parameter_prefix="lora_")
