"""PEFT's on-disk adapter format: key names, state dicts, safe reading (header first), atomic writing."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import warnings
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .config import WEIGHTS_NAME, LoraConfig
from .lora import LoraLayer, layer_shape, pattern_value, resolve_targets
from .storage import atomic_write

BIN_NAME = "adapter_model.bin"


class SizeMismatchError(ValueError, RuntimeError):
    """A tensor of the file does not fit the model. PEFT (torch's load_state_dict) raises RuntimeError "size
    mismatch"; smolpeft raised ValueError: both are caught."""


_MAX_HEADER = 100 << 20  # safetensors headers are JSON; anything this large is not an adapter


# --- key names ---------------------------------------------------------------------------------------------------


def _file_key(key: str, name: str) -> str | None:
    """PEFT's file key for a state-dict key of adapter `name` (the adapter name dropped), or None if the key is not
    that adapter's. Trained copies of whole modules are saved under the module's own path, as if not wrapped."""
    for part in ("lora_A", "lora_B"):
        if f".{part}.{name}." in key:
            return key.replace(f".{part}.{name}.", f".{part}.")
    for part in ("lora_embedding_A", "lora_embedding_B"):
        if key.endswith(f".{part}.{name}"):
            return key[: -len(name) - 1]
    if key.endswith(f".lora_magnitude_vector.{name}.weight"):  # DoRA's m: PEFT's file key has no ".weight"
        return key[: -len(name) - len(".weight") - 1]
    if f".modules_to_save.{name}." in key:
        return key.replace(f".modules_to_save.{name}.", ".")
    if key == f"prompt_encoder.{name}.embedding.weight":
        return "prompt_embeddings"
    return None


def _embedding_layers(model: nn.Module, adapter_name: str, save: bool | str, state: dict[str, Any]) -> dict[str, Any]:
    """Full embedding weights saved next to the adapter: with save_embedding_layers=True, or "auto" when LoRA
    targets an embedding layer (PEFT's rule) or the vocabulary was resized since the base checkpoint."""
    config = model.peft_config[adapter_name]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # or a bare injected model
    targets = getattr(config, "target_modules", None) or []
    names = [n for n, _ in inner.named_modules() if re.match(r"(.*\.)?(embed_tokens|lm_head)$", n)]
    if isinstance(targets, str) and targets != "all-linear":
        targeted = any(re.fullmatch(targets, n) for n in names)
    else:
        targeted = any(k in targets for k in ("embed_tokens", "lm_head"))
    if save == "auto":
        if targeted:
            warnings.warn(
                "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.", stacklevel=4
            )
            save = True
        elif _vocab_resized(inner, config):
            warnings.warn(
                "Setting `save_embedding_layers` to `True` as the embedding layer has been resized during finetuning.",
                stacklevel=4,
            )
            save = True
        else:
            save = False
    if save and not hasattr(inner, "get_input_embeddings"):
        warnings.warn(
            "Could not identify embedding layer(s) because the model is not a 🤗 transformers model.", stacklevel=4
        )
    if not save or not hasattr(inner, "get_input_embeddings"):
        return {}
    layers = [inner.get_input_embeddings(), inner.get_output_embeddings()]
    prefix = "" if inner is model else "base_model.model." if isinstance(config, LoraConfig) else "base_model."
    out = {}
    for path, m in inner.named_modules():
        base = m.base_layer if isinstance(m, LoraLayer) else m
        if any(x is layer for layer in layers if layer is not None for x in (m, base)):  # either may be the wrapper
            if targeted and not isinstance(m, LoraLayer):
                continue  # targeted: only the wrapped embeddings' base weights, as PEFT saves them
            key = f"{prefix}{path}.base_layer.weight" if isinstance(m, LoraLayer) else f"{prefix}{path}.weight"
            out[key] = state.get(key, base.weight)  # the state dict's entry, which has the same key
    return out


def _vocab_resized(inner: nn.Module, config) -> bool:
    base = getattr(config, "base_model_name_or_path", None)
    vocab = getattr(getattr(inner, "config", None), "vocab_size", None)
    path = os.path.join(base, "config.json") if base else None
    if not (vocab and path and os.path.isfile(path)):
        return False
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("vocab_size", vocab) != vocab


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """Adapter `adapter_name`'s tensors under PEFT's file keys, e.g. `base_model.model.q_proj.lora_A.weight`."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    state = model.state_dict() if state_dict is None else state_dict
    out = {fk: v for k, v in state.items() if (fk := _file_key(k, adapter_name)) is not None}
    out |= _trained_biases(model, adapter_name, state)
    return out | _embedding_layers(model, adapter_name, save_embedding_layers, state)


_WRAPPER_PART = r"(_fsdp_wrapped_module|_checkpoint_wrapped_module)\."


def _trained_biases(model: nn.Module, adapter_name: str, state: dict[str, Any]) -> dict[str, Any]:
    """Base biases saved with bias="all" (every `*.bias` key not another adapter's) or "lora_only" (`base_layer.bias`
    of the LoRA-wrapped layers), under PEFT's keys: the adapter name dropped before the last part."""
    bias = getattr(model.peft_config[adapter_name], "bias", "none")
    if bias == "all":
        others = [n for n in model.peft_config if n != adapter_name]
        keys = [
            k
            for k in state
            if (k == "bias" or k.endswith(".bias")) and not any(f".{o}." in k or k.endswith(f".{o}") for o in others)
        ]
    elif bias == "lora_only":
        # Module paths as state-dict keys spell them: FSDP and activation checkpointing wrappers leave them out.
        paths = [re.sub(_WRAPPER_PART, "", p) for p, m in model.named_modules() if isinstance(m, LoraLayer)]
        keys = [f"{p}.base_layer.bias" for p in paths]
        keys = [k for k in keys if k in state]
    else:
        return {}
    return {re.sub(rf"\.{re.escape(adapter_name)}(\.[^.]+)$", r"\1", k): state[k] for k in keys}


def _live(model: nn.Module, adapter_name: str, loaded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """File key -> live tensor of the model for adapter `adapter_name` (embedding layers only if the file has them)."""
    state = model.state_dict(keep_vars=True)
    with warnings.catch_warnings():  # "not a transformers model" is about saving; here we only look
        warnings.simplefilter("ignore")
        live = get_peft_model_state_dict(model, state, adapter_name, save_embedding_layers=True)
    own = {fk for k in state if (fk := _file_key(k, adapter_name)) is not None}
    return {k: v for k, v in live.items() if k in own or k in loaded}


_ADAPTER_PART = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_dropout|modules_to_save)(\.|$)")


def _original_key(key: str) -> str:
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its own keys, as before any adapter was injected (no adapter tensors)."""
    state = model.get_base_model().state_dict()
    return {_original_key(k): v for k, v in state.items() if not _ADAPTER_PART.search(k)}


def set_base_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> _IncompatibleKeys:
    """Load a state dict with the base model's own keys into the wrapped base (adapters untouched)."""
    inner = model.get_base_model()
    live = {_original_key(k): k for k in inner.state_dict() if not _ADAPTER_PART.search(k)}
    missing, unexpected = sorted(set(live) - set(state_dict)), sorted(set(state_dict) - set(live))
    if strict and (missing or unexpected):
        raise RuntimeError(f"base state dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    inner.load_state_dict({live[k]: v for k, v in state_dict.items() if k in live}, strict=False)
    return _IncompatibleKeys(missing, unexpected)


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """Copy a state dict with PEFT's file keys into adapter `adapter_name`; returns the missing and unexpected keys
    (missing adapter keys stay as they are, as in PEFT). Shapes are checked before anything is copied."""
    live = _live(model, adapter_name, peft_model_state_dict)
    # Like PEFT's load_state_dict(strict=False): a key naming a tensor of the model as it is (a base bias trained
    # with bias="all"/"lora_only" under another config, say) is loaded there too; other adapters' tensors never are.
    base = {k: v for k, v in model.state_dict(keep_vars=True).items() if not _ADAPTER_PART.search(k)}
    live |= {k: base[k] for k in peft_model_state_dict if k not in live and k in base}
    present = {k: v for k, v in live.items() if k in peft_model_state_dict}
    copy_into(present, peft_model_state_dict, "state dict", ignore_mismatched_sizes, strict=False)
    return _IncompatibleKeys(
        sorted(set(live) - set(peft_model_state_dict)), sorted(set(peft_model_state_dict) - set(live))
    )


def load_adapter_weights(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    adapter_name: str,
    source: str,
    ignore_mismatched_sizes: bool = False,
) -> None:
    """Strict form for files: every adapter key must be there and nothing else, or the model is left untouched."""
    copy_into(_live(model, adapter_name, weights), weights, source, ignore_mismatched_sizes, strict=True)


def copy_into(
    params: dict[str, torch.Tensor],
    loaded: dict[str, torch.Tensor],
    source: str,
    ignore_mismatched_sizes: bool = False,
    strict: bool = True,
) -> None:
    """Check names and shapes of every key first, then copy: a bad file leaves the model untouched."""
    missing = sorted(set(params) - set(loaded))
    unexpected = sorted(set(loaded) - set(params))
    if strict and unexpected:
        raise KeyError(
            f"{source}: {len(unexpected)} keys match no adapter layer of this model, e.g. {unexpected[0]!r} "
            "(an adapter for another architecture?)"
        )
    if strict and missing:
        raise KeyError(f"{source}: {len(missing)} adapter weights are missing, e.g. {missing[0]!r}")
    keep, skipped = {}, []
    for k, p in params.items():
        if k not in loaded:
            continue
        if loaded[k].shape != p.shape:
            if ignore_mismatched_sizes:
                skipped.append(f"- {k}: found shape {loaded[k].shape} in the checkpoint and {p.shape} in the model")
                continue
            raise SizeMismatchError(
                f"{source}: size mismatch: key {k!r} has shape {tuple(loaded[k].shape)}, the model expects "
                f"{tuple(p.shape)} (pass ignore_mismatched_sizes=True to skip such tensors)"
            )
        keep[k] = p
    if skipped:  # PEFT's warning: those tensors keep their initial values
        warnings.warn(
            "Some weights of PeftModel were not initialized from the model checkpoint and are being ignored because "
            "you passed `ignore_mismatched_sizes=True`: " + "\n".join(skipped),
            stacklevel=4,
        )
    with torch.no_grad():
        for k, p in keep.items():
            if p.is_meta:  # created with low_cpu_mem_usage: the loaded tensor takes its place (same object, dtype)
                new = loaded[k].to(p.dtype)
                torch.utils.swap_tensors(p, nn.Parameter(new, p.requires_grad) if isinstance(p, nn.Parameter) else new)
            else:
                p.copy_(loaded[k])


def resolve_dir(model_id: str | os.PathLike, subfolder: str | None = None, **hub: Any) -> str:
    """A local adapter directory, or a Hub repo id downloaded (config and weights only) to the local cache."""
    path = os.path.join(model_id, subfolder) if subfolder else str(model_id)
    if os.path.isdir(path) or os.path.exists(model_id) or str(model_id).count("/") != 1:
        return path
    from huggingface_hub import snapshot_download

    hub = {k: v for k, v in hub.items() if v is not None and k != "use_auth_token"}
    try:
        root = snapshot_download(
            str(model_id), allow_patterns=["*adapter_config.json", "*adapter_model.safetensors"], **hub
        )
    except Exception as e:
        raise FileNotFoundError(f"adapter directory not found: {model_id} (not local, and the Hub said: {e})") from e
    return os.path.join(root, subfolder) if subfolder else root


def load_peft_weights(model_id: str | os.PathLike, device: str | None = None, **hub: Any) -> dict[str, torch.Tensor]:
    """PEFT's name: the adapter weights of a local directory or Hub repo, on `device`."""
    return read_weights(resolve_dir(model_id, **hub), device=device)


# --- files -------------------------------------------------------------------------------------------------------


def save_weights(
    tensors: dict[str, torch.Tensor], directory: str | os.PathLike, safe_serialization: bool = True
) -> None:
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if safe_serialization:
        atomic_write(os.path.join(directory, WEIGHTS_NAME), save_safetensors_bytes(data, metadata={"format": "pt"}))
        return
    buf = io.BytesIO()
    torch.save(data, buf)  # writing a tensor dict is safe; it is reading pickles that is not (see read_weights)
    atomic_write(os.path.join(directory, BIN_NAME), buf.getvalue())


def read_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype, shape) from a safetensors file's header, without reading the tensors."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_HEADER):
            raise ValueError(f"{path} is not a valid safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a valid safetensors file (bad header: {e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a valid safetensors file (header is not a JSON object)")
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if not (
            isinstance(v, dict) and isinstance(v.get("shape"), list) and all(isinstance(d, int) for d in v["shape"])
        ):
            raise ValueError(f"{path}: tensor {k!r} has a malformed header entry")
        out[k] = (v.get("dtype"), tuple(v["shape"]))
    return out


def _safe_torch_load() -> bool:
    # torch.load(weights_only=True) could still run code before torch 2.6 (CVE-2025-32434).
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 6)


def read_weights(directory: str | os.PathLike, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Read adapter weights: safetensors, or a legacy .bin through torch.load(weights_only=True), never pickle."""
    st, binpath = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, BIN_NAME)
    if os.path.isfile(st):
        with open(st, "rb") as f:
            raw = f.read()
        try:
            out = load_safetensors_bytes(raw)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise ValueError(f"{st} is not a valid safetensors file (truncated or corrupt?): {e}") from e
    elif os.path.isfile(binpath):
        if not _safe_torch_load():
            raise ValueError(
                f"{binpath}: reading .bin adapters needs torch>=2.6 (older weights_only loaders are unsafe)"
            )
        try:
            out = torch.load(binpath, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{binpath} could not be read as a weights-only torch file: {e}") from e
        if not (isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values())):
            raise ValueError(f"{binpath} does not hold a dict of tensors")
    else:
        raise FileNotFoundError(f"no adapter weights in {directory}: expected {WEIGHTS_NAME}")
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def check_header(
    directory: str | os.PathLike, inner: nn.Module, config: LoraConfig, ignore_mismatched_sizes: bool = False
) -> None:
    """Before anything is allocated: every tensor's shape in the file agrees with the config and the base model,
    and the adapter the config describes is not far larger than the file (a config promising r=500000 on a 15 kB
    file would otherwise allocate gigabytes)."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        return  # a .bin is read whole and checked by shape when copied
    shapes = {k: s for k, (_, s) in read_header(path).items()}
    file_numel = sum(torch.Size(s).numel() for s in shapes.values())
    if not isinstance(config, LoraConfig):
        n, dim = config.num_virtual_tokens, inner.get_input_embeddings().embedding_dim
        got = shapes.get("prompt_embeddings")
        if got is not None and got != (n, dim):
            raise ValueError(f"{path}: prompt_embeddings has shape {got}; the config and model give {(n, dim)}")
        return
    promised = 0
    for target in resolve_targets(inner, config):
        module = inner.get_submodule(target)
        fan_in, fan_out, _ = layer_shape(module.base_layer if isinstance(module, LoraLayer) else module)
        r = pattern_value(target, config.rank_pattern, config.r)
        promised += r * (fan_in + fan_out)
        emb = isinstance(module.base_layer if isinstance(module, LoraLayer) else module, nn.Embedding)
        keys = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        for key, want in zip(keys, ((r, fan_in), (fan_out, r))):
            full = f"base_model.model.{target}.{key}"
            got = shapes.get(full)
            if got is not None and got != want and not ignore_mismatched_sizes:
                raise SizeMismatchError(
                    f"{path}: size mismatch: key {full!r} has shape {got}, the model expects {want} "
                    f"(config r={r}, layer {fan_in} -> {fan_out})"
                )
    if promised > 2 * file_numel + (1 << 20) and not ignore_mismatched_sizes:
        raise ValueError(
            f"{path}: the config describes {promised:,} adapter weights but the file holds {file_numel:,}; "
            "refusing to allocate an adapter the file cannot fill (wrong r or target_modules?)"
        )


def head_shapes(directory: str | os.PathLike) -> list[tuple[int, ...]]:
    """Shapes of the saved classification head's 2-D weights (classifier / score), in file order."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        return []
    return [
        s
        for k, (_, s) in read_header(path).items()
        if re.search(r"\.(classifier|score)(\.[^.]+)*\.weight$", k) and len(s) == 2
    ]


# --- PiSSA / OLoRA as plain LoRA ---------------------------------------------------------------------------------


def is_principal(config: Any) -> bool:
    """PiSSA (also "pissa_niter_N"), OLoRA and CorDA adapters: trained over the residual W - s·B₀A₀, not over W."""
    init = getattr(config, "init_lora_weights", None)
    return isinstance(init, str) and (init.startswith("pissa") or init.lower() in ("olora", "corda"))


def principal_config(config: LoraConfig) -> LoraConfig:
    """The plain-LoRA config of a converted PiSSA/OLoRA/CorDA adapter: rank 2r and the same scaling s."""
    import dataclasses

    grow = 2**0.5 if config.use_rslora else 2  # s = alpha/r (or alpha/√r) is unchanged at rank 2r
    return dataclasses.replace(
        config,
        r=2 * config.r,
        lora_alpha=grow * config.lora_alpha,
        init_lora_weights=True,
        corda_config=None,  # read only by the CorDA init, which a plain LoRA adapter does not run
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: grow * v for k, v in config.alpha_pattern.items()},
    )


def _stack_principal(weights: dict[str, torch.Tensor], initial) -> dict[str, torch.Tensor]:
    """A' = [A; A₀], B' = [B, -B₀]: W_res + s·B A = W + s·(B A - B₀ A₀) = W + s·B' A'."""
    out = dict(weights)
    for key, A in weights.items():
        if key.endswith(".lora_A.weight"):
            bkey = key[: -len("lora_A.weight")] + "lora_B.weight"
            A0, B0 = initial(key[: -len(".lora_A.weight")], A.shape[0])
            out[key] = torch.cat([A, A0.to(A.dtype)])
            out[bkey] = torch.cat([weights[bkey], -B0.to(A.dtype)], dim=1)
    return out


def principal_weights(
    inner: nn.Module, config: LoraConfig, weights: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Convert a PiSSA/OLoRA adapter file to plain LoRA against the unmodified base: A₀, B₀ are recomputed from it."""
    if str(config.init_lora_weights).startswith("pissa_niter_"):
        warnings.warn(
            f"init_lora_weights={config.init_lora_weights!r}: the randomized SVD that split the base when this adapter "
            "was created is drawn again on load (as in PEFT), so the loaded adapter matches the trained one only as "
            "far as two draws agree; save with path_initial_model_for_weight_conversion for an exact plain-LoRA file",
            stacklevel=4,
        )

    def initial(key: str, r: int):
        path = key.removeprefix("base_model.model.")
        layer = inner.get_submodule(path)
        alpha = pattern_value(path, config.alpha_pattern, config.lora_alpha)
        if config.init_lora_weights == "corda":  # needs preprocess_corda's decomposition on this model's layers
            return layer.corda_factors(r, config.scaling(r, alpha))
        return layer.principal_factors(config.init_lora_weights, r, config.scaling(r, alpha))

    return _stack_principal(weights, initial)


def principal_to_lora(config: LoraConfig, params: dict[str, torch.Tensor], initial_dir: str | os.PathLike):
    """save_pretrained(path_initial_model_for_weight_conversion=...): the trained PiSSA/OLoRA adapter as plain LoRA,
    using the untrained adapter saved at `initial_dir` for A₀, B₀. Returns (config, tensors)."""
    if not is_principal(config):
        raise ValueError(
            "path_initial_model_for_weight_conversion converts PiSSA/OLoRA adapters (and CorDA ones); this one is "
            f"init_lora_weights={getattr(config, 'init_lora_weights', None)!r}"
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        # alpha' = √2·alpha keeps s = alpha/√r at rank 2r only where alpha and r come from the same place; PEFT
        # refuses the combination rather than guess, and so do we (its message).
        raise ValueError(
            "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when "
            "using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`."
        )
    init = read_weights(initial_dir)

    def initial(key: str, r: int):
        return init[f"{key}.lora_A.weight"], init[f"{key}.lora_B.weight"]

    return principal_config(config), _stack_principal(params, initial)


def write_model_card(
    directory: str | os.PathLike,
    config: Any,
    base_model: str | None = None,
    tags: list[str] | None = None,
    pipeline_tag: str | None = None,
) -> None:
    """README.md as PEFT writes it: Hub metadata (library_name, tags, base_model) over the Hub's model-card template,
    or over the card already there, whose text is kept (PEFT updates an existing card rather than replacing it).
    `base_model` is the base's config `_name_or_path` (None for a model without a config), `tags` PEFT's tags.
    (PEFT also means to note a bitsandbytes quantization config, but its check never fires, so neither do we.)"""
    from importlib.metadata import PackageNotFoundError, version

    from huggingface_hub import ModelCard, ModelCardData

    try:  # the installed distribution's version (the package root is not imported from here)
        __version__ = version("smolpeft")
    except PackageNotFoundError:
        __version__ = "(not installed)"

    path = os.path.join(directory, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    card.data["tags"] = sorted(set(tags or []) | {"smolpeft"})
    if pipeline_tag and not card.data.pipeline_tag:
        card.data.pipeline_tag = pipeline_tag
    if base_model is not None:
        card.data["base_model"] = base_model
    lines = card.text.splitlines()
    version = f"- smolpeft {__version__} (PEFT format)"
    if version not in lines:
        heading = "### Framework versions"
        if heading in lines:
            lines.insert(lines.index(heading) + 2, version)
        else:
            lines.append(f"{heading}\n\n{version}")
    card.text = "\n".join(lines)
    atomic_write(path, str(card).encode())
