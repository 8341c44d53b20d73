"""LoRA: a wrapper around a frozen layer that adds a trainable low-rank update, and its injection."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import DEFAULT_TARGETS, LoraConfig

BASE = "__base__"  # row name in a mixed batch that gets no adapter


@dataclass
class AdapterState:
    """What every adapter layer of one model reads at forward time; one object, shared, so switching is O(1)."""

    active: str | None = "default"
    disabled: bool = False
    row_adapters: list[str] | None = None  # one adapter name per batch row (mixed-adapter batches)


def _is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"  # bitsandbytes is imported lazily, only where installed


def _shape(base: nn.Module) -> tuple[int, int, bool]:
    """(in, out, transposed): LoRA sees every base as x ↦ W x with W out×in; Conv1D and Embedding store Wᵀ."""
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim, True
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1], True
    if isinstance(base, nn.Linear) or _is_4bit(base):
        return base.in_features, base.out_features, False
    raise TypeError(f"LoRA supports Linear, Conv1D, Embedding and bitsandbytes Linear4bit, not {type(base).__name__}")


def base_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as a dense float tensor (dequantized for 4-bit)."""
    if _is_4bit(base):
        from .qlora import dequantize_weight

        return dequantize_weight(base)
    return base.weight.data


class LoraLayer(nn.Module):
    """y = base(x) + s · B A dropout(x), with A r×in, B out×r and s = alpha/r (alpha/√r with rsLoRA).

    Holds any number of named adapters; which one runs is read from the shared `AdapterState`.
    For an Embedding the input is token ids, so `A x` becomes a lookup into the columns of A.
    """

    def __init__(self, base_layer: nn.Module, state: AdapterState):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = _shape(base_layer)
        self.is_embedding = isinstance(base_layer, nn.Embedding)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.merged_adapters: list[str] = []
        self.state = state
        self._stacked: tuple = (None, None, None)  # (key, factors, source tensors) for mixed batches; see _stack

    def add(self, name: str, r: int, alpha: float, dropout: float, config: LoraConfig) -> None:
        w = base_weight(self.base_layer)
        # Half-precision bases keep fp32 adapters, as PEFT does: updates of size lr·grad vanish in bf16.
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        A = torch.empty(r, self.in_features, device=w.device, dtype=dtype)
        B = torch.empty(self.out_features, r, device=w.device, dtype=dtype)
        self.scaling[name] = config.scaling(r, alpha)
        self.r[name] = r
        # First draw what PEFT draws when it builds its factors (nn.Linear defaults, randn for embeddings), so that
        # a seeded script gives the same adapter in both libraries; init=False keeps exactly these values.
        if self.is_embedding:
            A.normal_(), B.normal_()
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5)), nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        init = config.init_lora_weights
        if init is False:
            pass
        elif self.is_embedding:  # embeddings: A = 0, B ~ N(0, 1)
            nn.init.zeros_(A), nn.init.normal_(B)
        elif init == "gaussian":
            nn.init.normal_(A, std=1 / r), nn.init.zeros_(B)
        elif init in ("pissa", "olora"):
            A, B = self._principal_init(init, r, self.scaling[name], dtype)
        else:  # True: A Kaiming-uniform, B = 0, so the adapter starts as the identity
            nn.init.kaiming_uniform_(A, a=math.sqrt(5)), nn.init.zeros_(B)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _principal_init(self, kind: str, r: int, s: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """PiSSA (top-r SVD) or OLoRA (QR) factors of W; the base keeps the residual W - s·B A."""
        if _is_4bit(self.base_layer):
            raise ValueError(f"init_lora_weights={kind!r} needs a full-precision base layer, found 4-bit")
        W = self.base_layer.weight.data
        Wm = (W.T if self.fan_in_fan_out else W).float()  # out×in
        if kind == "pissa":
            U, S, Vh = torch.linalg.svd(Wm, full_matrices=False)
            root = S[:r].sqrt() / math.sqrt(s)
            B, A = U[:, :r] * root, root[:, None] * Vh[:r]
        else:
            Q, R = torch.linalg.qr(Wm)
            B, A = Q[:, :r] / math.sqrt(s), R[:r] / math.sqrt(s)
        residual = Wm - s * (B @ A)
        W.copy_((residual.T if self.fan_in_fan_out else residual).to(W.dtype))
        return A.to(dtype).contiguous(), B.to(dtype).contiguous()

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s · B A, laid out like the base weight."""
        d = (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]
        return d.T if self.fan_in_fan_out else d

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        if self.is_embedding:
            return F.embedding(x, A.T, padding_idx=self.base_layer.padding_idx) @ B.T * self.scaling[name]
        return F.linear(F.linear(self.lora_dropout[name](x.to(A.dtype)), A), B) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        st = self.state
        if st.disabled or self.merged_adapters:
            return out
        if st.row_adapters is not None:
            return self._mixed_forward(x, out, st.row_adapters)
        name = st.active
        if name not in self.lora_A:
            return out
        A, B = self.lora_A[name], self.lora_B[name]
        if self.is_embedding or out.dtype != B.dtype:
            return out + self._delta(x, name).to(out.dtype)
        h = F.linear(self.lora_dropout[name](x.to(A.dtype)), A)
        # s·B folds the scaling into the small r×out factor, and addmm adds the product to out in one kernel. With
        # no graph to record (inference), it adds in place and skips the copy of out; under autograd an in-place
        # op on a view of out would cost more in backward than the copy saves.
        flat, h, Bs = out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), (B * self.scaling[name]).T
        if torch.is_grad_enabled():
            return torch.addmm(flat, h, Bs).view(out.shape)
        return flat.addmm_(h, Bs).view(out.shape)

    def _mixed_forward(self, x: torch.Tensor, out: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Each row of the batch gets its own adapter (or none)."""
        names = expand_rows(names, x.shape[0])
        present = [n for n in dict.fromkeys(names) if n in self.lora_A]  # BASE and adapters not on this layer: none
        if not present:
            return out
        if self.is_embedding or self.training or torch.is_grad_enabled() or len({self.r[n] for n in present}) > 1:
            # Grouped: each adapter runs once on its rows (dropout, gradients and unequal ranks stay exact).
            out = out.clone()
            for name in present:
                rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
                out[rows] += self._delta(x[rows], name).to(out.dtype)
            return out
        # Inference with equal ranks: gather each row's factors and run two batched matmuls for the whole batch,
        # the second accumulating into the base output in place. Rows without an adapter gather a zero factor.
        A, B = self._stack(present)
        slot = torch.tensor([present.index(n) if n in present else len(present) for n in names], device=x.device)
        xb = x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype)
        h = torch.bmm(xb, A[slot].transpose(1, 2))
        if out.dtype != B.dtype:
            return out + torch.bmm(h, B[slot].transpose(1, 2)).to(out.dtype).view(out.shape)
        o = out.reshape(x.shape[0], -1, out.shape[-1])
        o.baddbmm_(h, B[slot].transpose(1, 2))  # inference only: out is ours to overwrite
        return o.view(out.shape)

    def _stack(self, present: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(k+1)×r×in A's and (k+1)×out×r scaled B's of the present adapters plus a zero slot, rebuilt only when an
        adapter's tensors change (in-place updates bump the tensor version, reloads replace the tensor)."""
        tensors = [t for n in present for t in (self.lora_A[n], self.lora_B[n])]
        key = (tuple(present), tuple(id(t) for t in tensors), tuple(t._version for t in tensors),
               tuple(self.scaling[n] for n in present))
        if self._stacked[0] != key:
            with torch.no_grad():
                As = [self.lora_A[n] for n in present]
                Bs = [self.lora_B[n] * self.scaling[n] for n in present]
                factors = torch.stack([*As, torch.zeros_like(As[0])]), torch.stack([*Bs, torch.zeros_like(Bs[0])])
            # The tensors are kept with the key so that their ids cannot be reused by new tensors while cached.
            self._stacked = (key, factors, tensors)
        return self._stacked[1]

    def merge(self, name: str, safe: bool = False) -> None:
        if name in self.merged_adapters or name not in self.lora_A:
            return
        if _is_4bit(self.base_layer):
            from .qlora import merge_4bit

            merge_4bit(self.base_layer, self.delta_weight(name))
        else:
            W = self.base_layer.weight
            new = W.data + self.delta_weight(name).to(W.dtype)
            if safe and not torch.isfinite(new).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; the layer was left unmerged")
            W.data = new
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if _is_4bit(self.base_layer):
                from .qlora import merge_4bit

                merge_4bit(self.base_layer, -self.delta_weight(name))
            else:
                W = self.base_layer.weight
                W.data -= self.delta_weight(name).to(W.dtype)

    def delete(self, name: str) -> None:
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            _discard(d, name)
        self.scaling.pop(name, None), self.r.pop(name, None)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}, merged={self.merged_adapters}"


class ModulesToSave(nn.Module):
    """A whole module trained in full (a classifier head, say): one copy per adapter, the original kept frozen."""

    def __init__(self, original_module: nn.Module, state: AdapterState):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.state = state

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.modules_to_save[name].requires_grad_(True)

    def _pick(self, name: str | None) -> nn.Module:
        if self.state.disabled or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self.state.row_adapters
        if names is None:
            return self._pick(self.state.active)(x, *args, **kwargs)
        names = expand_rows(names, x.shape[0])
        parts = {}
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            parts[name] = (rows, self._pick(name)(x[rows], *args, **kwargs))
        first = next(iter(parts.values()))[1]
        out = first.new_empty((x.shape[0], *first.shape[1:]))
        for rows, y in parts.values():
            out[rows] = y
        return out


def _discard(d: nn.ModuleDict | nn.ParameterDict, key: str) -> None:
    if key in d:
        del d[key]


def expand_rows(names: list[str], batch: int) -> list[str]:
    """Per-row adapter names, repeated when generate() expands rows (beams, num_return_sequences)."""
    if len(names) == batch:
        return names
    if batch % len(names):
        raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch} rows")
    k = batch // len(names)
    return [n for n in names for _ in range(k)]


# --- injection -------------------------------------------------------------------------------------------------

_SUPPORTED = (nn.Linear, Conv1D, nn.Embedding)


def _is_adaptable(m: nn.Module) -> bool:
    return isinstance(m, _SUPPORTED) or _is_4bit(m)


def _name_matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _layer_index_ok(name: str, config: LoraConfig) -> bool:
    if config.layers_to_transform is None:
        return True
    patterns = config.layers_pattern or [r"[^.]*"]
    patterns = [patterns] if isinstance(patterns, str) else patterns
    for p in patterns:
        m = re.match(rf".*\.{p}\.(\d+)\.", name)
        if m:
            return int(m.group(1)) in config.layers_to_transform
    return False


def _user_modules(model: nn.Module):
    """named_modules() without the insides of our own wrappers."""
    for name, m in model.named_modules():
        if re.search(r"(^|\.)(base_layer|lora_A|lora_B|lora_dropout|original_module|modules_to_save)(\.|$)", name):
            continue
        yield name, m


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules `config` puts LoRA on; raises with real module names when nothing matches."""
    spec = config.target_modules
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"no default target_modules for model_type={model_type!r}; pass target_modules "
                f"(known defaults: {', '.join(sorted(DEFAULT_TARGETS))})"
            )
        spec = DEFAULT_TARGETS[model_type]
    linear_only = spec == "all-linear"
    if linear_only:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        spec = r".*"
    names = []
    for name, m in _user_modules(model):
        base = m.base_layer if isinstance(m, LoraLayer) else m
        if not name or not _name_matches(name, spec):
            continue
        if linear_only and (isinstance(base, nn.Embedding) or base is head or not _is_adaptable(base)):
            continue
        if config.exclude_modules and _name_matches(name, config.exclude_modules):
            continue
        if not _layer_index_ok(name, config) or isinstance(m, ModulesToSave):
            continue
        if not _is_adaptable(base):
            if linear_only or isinstance(spec, str):
                continue  # a regex may match containers; only leaf layers are targets
            raise TypeError(
                f"target module {name!r} is a {type(base).__name__}; LoRA supports Linear, Conv1D, Embedding, Linear4bit"
            )
        names.append(name)
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in _user_modules(model) if _is_adaptable(m)})
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}; "
            f"layer names it has: {', '.join(leaves[:30])}"
        )
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _pattern_value(name: str, patterns: dict, default):
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?{p}$", name):
            return v
    return default


def inject(model: nn.Module, config: LoraConfig, name: str, state: AdapterState) -> list[str]:
    """Wrap every target layer in a LoraLayer (once) and add adapter `name` to it."""
    targets = resolve_targets(model, config)
    for path in targets:
        layer = model.get_submodule(path)
        if not isinstance(layer, LoraLayer):
            layer = LoraLayer(layer, state)
            _replace(model, path, layer)
        r = _pattern_value(path, config.rank_pattern, config.r)
        alpha = _pattern_value(path, config.alpha_pattern, config.lora_alpha)
        layer.add(name, r, alpha, config.lora_dropout, config)
    if config.target_modules == "all-linear":
        config.target_modules = targets  # PEFT saves the resolved names, so the file loads on any version
    elif config.target_modules is None:
        config.target_modules = list(DEFAULT_TARGETS[model.config.model_type])
    return targets


def add_modules_to_save(model: nn.Module, module_names: list[str], name: str, state: AdapterState) -> list[str]:
    found = []
    for path, m in list(_user_modules(model)):
        if path and _name_matches(path, module_names) and not isinstance(m, LoraLayer):
            if not isinstance(m, ModulesToSave):
                m = ModulesToSave(m, state)
                _replace(model, path, m)
            m.add(name)
            found.append(path)
    return found


def lora_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def remove_wrappers(model: nn.Module, merged: bool, only_empty: bool = False) -> None:
    """Put plain modules back. merged: keep the (already merged) base weights and the active adapter's heads;
    otherwise unmerge and restore the originals. only_empty: just the wrappers left with no adapter."""
    for path, m in list(model.named_modules()):
        if isinstance(m, LoraLayer) and not (only_empty and m.lora_A):
            if not merged:
                m.unmerge()
            _replace(model, path, m.base_layer)
        elif isinstance(m, ModulesToSave) and not (only_empty and len(m.modules_to_save)):
            active = m.state.active
            keep = m.modules_to_save[active] if merged and active in m.modules_to_save else m.original_module
            _replace(model, path, keep)
