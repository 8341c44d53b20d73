"""LoRA: a wrapper around a frozen layer that adds a trainable low-rank update, and its injection."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import DEFAULT_TARGETS, LoraConfig
from .qlora import dense_weight, is_quantized, set_dense_weight

BASE = "__base__"  # row name in a mixed batch that gets no adapter


@dataclass
class AdapterState:
    """What every adapter layer of one model reads at forward time; one object, shared, so switching is O(1)."""

    active: list[str] = field(default_factory=lambda: ["default"])  # PEFT allows several active adapters: deltas add
    disabled: bool = False
    row_adapters: list[str] | None = None  # one adapter name per batch row (mixed-adapter batches)


def _shape(base: nn.Module) -> tuple[int, int, bool]:
    """(in, out, transposed): LoRA sees every base as x ↦ W x with W out×in; Conv1D and Embedding store Wᵀ."""
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim, True
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1], True
    if isinstance(base, nn.Linear) or is_quantized(base):
        return base.in_features, base.out_features, False
    raise TypeError(
        f"LoRA supports Linear, Conv1D, Embedding and bitsandbytes Linear4bit/Linear8bitLt, not {type(base).__name__}"
    )


class LoraLayer(nn.Module):
    """y = base(x) + Σ_active s · B A dropout(x), with A r×in, B out×r and s = alpha/r (alpha/√r with rsLoRA).

    Holds any number of named adapters under PEFT's names: `lora_A[name]` / `lora_B[name]` are bias-free
    nn.Linear layers, and for an Embedding base `lora_embedding_A[name]` (r×vocab) / `lora_embedding_B[name]`
    (dim×r) are plain parameters, since `A x` on token ids is a lookup into the columns of A. Which adapters run
    is read from the shared `AdapterState`.
    """

    def __init__(self, base_layer: nn.Module, state: AdapterState):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = _shape(base_layer)
        self.is_embedding = isinstance(base_layer, nn.Embedding)
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict(), nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        self.state = state
        self._stacked: tuple = (None, None, None)  # (key, factors, source tensors) for mixed batches; see _stack

    # PEFT's layer attributes, read from the shared state
    @property
    def active_adapters(self) -> list[str]:
        return list(self.state.active)

    @property
    def active_adapter(self) -> str | list[str]:
        return self.state.active[0] if len(self.state.active) == 1 else list(self.state.active)

    @property
    def disable_adapters(self) -> bool:
        return self.state.disabled

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def weight(self) -> torch.Tensor:  # code that reads `layer.weight` (tied embeddings, dtype checks) sees the base
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """PEFT's per-layer call. The state is shared by every layer of the model, so this switches them all."""
        self.state.active = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)

    def _all_available_adapter_names(self) -> list[str]:
        return list(self.r)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of adapter `name` as tensors: r×in and out×r."""
        if self.is_embedding:
            return self.lora_embedding_A[name], self.lora_embedding_B[name]
        return self.lora_A[name].weight, self.lora_B[name].weight

    def add(self, name: str, r: int, alpha: float, dropout: float, config: LoraConfig, fp32: bool = True) -> None:
        w = self.base_layer.weight
        # Half-precision and quantized bases get fp32 adapters, as PEFT's autocast_adapter_dtype=True gives them:
        # updates of size lr·grad vanish in bf16. fp32=False keeps a half-precision base's dtype.
        floating = w.dtype.is_floating_point and w.dtype.itemsize >= 2 and not is_quantized(self.base_layer)
        dtype = w.dtype if (w.dtype == torch.float64 or not fp32) and floating else torch.float32
        kw = dict(device=w.device, dtype=dtype)
        self.scaling[name], self.r[name], self.lora_alpha[name] = config.scaling(r, alpha), r, alpha
        # Built as PEFT builds them (nn.Linear draws Kaiming-uniform, embeddings randn), so that a seeded script draws
        # the same numbers in both libraries; init=False keeps exactly these values.
        if self.is_embedding:
            A = nn.Parameter(torch.empty(r, self.in_features, **kw).normal_())
            B = nn.Parameter(torch.empty(self.out_features, r, **kw).normal_())
            self.lora_embedding_A[name], self.lora_embedding_B[name] = A, B
        else:
            self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)
            self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **kw)
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init = config.init_lora_weights
        with torch.no_grad():
            if init is False:
                pass
            elif self.is_embedding:  # embeddings: A = 0, B ~ N(0, 1)
                nn.init.zeros_(A), nn.init.normal_(B)
            elif init == "gaussian":
                nn.init.normal_(A, std=1 / r), nn.init.zeros_(B)
            elif init in ("pissa", "olora"):
                A0, B0 = self.principal_factors(init, r, self.scaling[name])
                A.copy_(A0), B.copy_(B0)
                self.set_base_weight(dense_weight(self.base_layer).float() - self.scaling[name] * self._layout(B0 @ A0))
            else:  # True: A Kaiming-uniform, B = 0, so the adapter starts as the identity
                nn.init.kaiming_uniform_(A, a=math.sqrt(5)), nn.init.zeros_(B)

    def principal_factors(self, kind: str, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        """PiSSA (top-r SVD) or OLoRA (QR) factors (A₀, B₀) of the base weight, with s·B₀A₀ its principal part.
        Pure: the caller decides whether the base becomes the residual W - s·B₀A₀."""
        if self.is_embedding or is_quantized(self.base_layer):
            raise ValueError(f"init_lora_weights={kind!r} needs a full-precision Linear or Conv1D base layer")
        Wm = self._layout(self.base_layer.weight.data).float()  # out×in
        if kind == "pissa":
            U, S, Vh = torch.linalg.svd(Wm, full_matrices=False)
            root = S[:r].sqrt() / math.sqrt(s)
            B, A = U[:, :r] * root, root[:, None] * Vh[:r]
        else:  # OLoRA keeps Q and R unscaled (PEFT's definition), so the base loses s·Q_r R_r
            Q, R = torch.linalg.qr(Wm)
            B, A = Q[:, :r], R[:r]
        return A.contiguous(), B.contiguous()

    def _layout(self, w: torch.Tensor) -> torch.Tensor:
        """Between LoRA's out×in view and the base's storage (transposed for Conv1D and Embedding)."""
        return w.T if self.fan_in_fan_out else w

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s · B A, laid out like the base weight, in the adapter's (fp32) dtype."""
        A, B = self.factors(name)
        return self._layout(B @ A) * self.scaling[name]

    def set_base_weight(self, new: torch.Tensor) -> None:
        """Replace the base weight by `new` (laid out like it), re-quantizing a 4-bit or 8-bit base."""
        if is_quantized(self.base_layer):
            set_dense_weight(self.base_layer, new)
        else:
            self.base_layer.weight.data = new.to(self.base_layer.weight.dtype)

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.factors(name)
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
        for name in st.active:
            if name in self.r:
                out = self._add_delta(out, x, name)
        return out

    def _add_delta(self, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.factors(name)
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
        present = [n for n in dict.fromkeys(names) if n in self.r]  # BASE and adapters not on this layer: none
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
        tensors = [t for n in present for t in self.factors(n)]
        key = (tuple(present), tuple(id(t) for t in tensors), tuple(t._version for t in tensors),
               tuple(self.scaling[n] for n in present))
        if self._stacked[0] != key:
            with torch.no_grad():
                As = [self.factors(n)[0] for n in present]
                Bs = [self.factors(n)[1] * self.scaling[n] for n in present]
                factors = torch.stack([*As, torch.zeros_like(As[0])]), torch.stack([*Bs, torch.zeros_like(Bs[0])])
            # The tensors are kept with the key so that their ids cannot be reused by new tensors while cached.
            self._stacked = (key, factors, tensors)
        return self._stacked[1]

    def merge(self, name: str, safe: bool = False) -> None:
        """W ← W + ΔW. The fp32 ΔW is added in place, so a half-precision W is rounded once, as PEFT rounds it."""
        if name in self.merged_adapters or name not in self.r:
            return
        delta = self.get_delta_weight(name)
        quantized = is_quantized(self.base_layer)
        W = dense_weight(self.base_layer) if quantized else self.base_layer.weight.data
        new = W.to(delta.dtype) + delta if quantized else (W.clone() if safe else W).add_(delta)
        if safe and not torch.isfinite(new).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken "
                             "(the layer was left unmerged)")
        if quantized or safe:
            self.set_base_weight(new)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            delta = self.get_delta_weight(name)
            if is_quantized(self.base_layer):
                self.set_base_weight(dense_weight(self.base_layer).to(delta.dtype) - delta)
            else:
                self.base_layer.weight.data.sub_(delta)

    def delete(self, name: str) -> None:
        for d in (self.lora_A, self.lora_B, self.lora_embedding_A, self.lora_embedding_B, self.lora_dropout):
            _discard(d, name)
        for d in (self.scaling, self.r, self.lora_alpha):
            d.pop(name, None)

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

    @property
    def active_adapter(self) -> str | None:
        return next((n for n in self.state.active if n in self.modules_to_save), None)

    @property
    def active_adapters(self) -> list[str]:
        return [n for n in self.state.active if n in self.modules_to_save]

    @property
    def weight(self) -> torch.Tensor:
        return self._pick(self.active_adapter).weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self.state.row_adapters
        if names is None:
            return self._pick(self.active_adapter)(x, *args, **kwargs)
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
    return isinstance(m, _SUPPORTED) or is_quantized(m)


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
        if re.search(r"(^|\.)(base_layer|lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_dropout|original_module|modules_to_save)(\.|$)", name):
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


def _pattern_value(name: str, patterns: dict, default):
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?{p}$", name):
            return v
    return default


def inject(model: nn.Module, config: LoraConfig, name: str, state: AdapterState, fp32: bool = True) -> list[str]:
    """Wrap every target layer in a LoraLayer (once) and add adapter `name` to it."""
    targets = resolve_targets(model, config)
    for path in targets:
        layer = model.get_submodule(path)
        if not isinstance(layer, LoraLayer):
            layer = LoraLayer(layer, state)
            model.set_submodule(path, layer)
        r = _pattern_value(path, config.rank_pattern, config.r)
        alpha = _pattern_value(path, config.alpha_pattern, config.lora_alpha)
        layer.add(name, r, alpha, config.lora_dropout, config, fp32=fp32)
    if config.target_modules == "all-linear":
        config.target_modules = targets  # PEFT (0.21) saves the resolved full names, so the file loads on any version
    elif config.target_modules is None:
        config.target_modules = list(DEFAULT_TARGETS[model.config.model_type])
    return targets


def add_modules_to_save(model: nn.Module, module_names: list[str], name: str, state: AdapterState) -> list[str]:
    found = []
    for path, m in list(_user_modules(model)):
        if path and _name_matches(path, module_names) and not isinstance(m, LoraLayer):
            if not isinstance(m, ModulesToSave):
                m = ModulesToSave(m, state)
                model.set_submodule(path, m)
            m.add(name)
            found.append(path)
    return found


def modules_to_save_copies(model: nn.Module, name: str) -> list[nn.Module]:
    """Adapter `name`'s trained copies of whole modules."""
    return [m.modules_to_save[name] for _, m in model.named_modules()
            if isinstance(m, ModulesToSave) and name in m.modules_to_save]


def delete_modules_to_save(model: nn.Module, name: str) -> None:
    for _, m in list(model.named_modules()):
        if isinstance(m, ModulesToSave) and name in m.modules_to_save:
            del m.modules_to_save[name]
    remove_wrappers(model, merged=False, only_empty=True)


def lora_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def remove_wrappers(model: nn.Module, merged: bool, only_empty: bool = False) -> None:
    """Put plain modules back. merged: keep the (already merged) base weights and the active adapter's heads;
    otherwise unmerge and restore the originals. only_empty: just the wrappers left with no adapter."""
    for path, m in list(model.named_modules()):
        if isinstance(m, LoraLayer) and not (only_empty and m.r):
            if not merged:
                m.unmerge()
            model.set_submodule(path, m.base_layer)
        elif isinstance(m, ModulesToSave) and not (only_empty and len(m.modules_to_save)):
            active = m.active_adapter
            keep = m.modules_to_save[active] if merged and active is not None else m.original_module
            model.set_submodule(path, keep)
