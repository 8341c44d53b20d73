"""LoRA: a wrapper around a frozen layer that adds a trainable low-rank update, and its injection."""

from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

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


def layer_shape(base: nn.Module) -> tuple[int, int, bool]:
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


def is_principal_init(init: bool | str) -> bool:
    """PiSSA ("pissa", "pissa_niter_N") and OLoRA (any case): inits that move W's principal part into the adapter,
    leaving the base the residual W - s·B₀A₀."""
    return isinstance(init, str) and (init.startswith("pissa") or init.lower() == "olora")


def base_rewrite_warning(new: LoraConfig, existing: list[LoraConfig]) -> str | None:
    """PEFT's warning when an adapter whose init rewrote the base (PiSSA, CorDA, OLoRA: W becomes W - s·B₀A₀) shares
    the model with others, which then compute on that residual. Loaded ones are plain LoRA here (init True), so only
    adapters created in this process count."""
    if not existing:
        return None
    inits = [c.init_lora_weights for c in [new, *existing] if isinstance(c.init_lora_weights, str)]
    for method, name, anchor in (
        ("pissa", "PiSSA", "pissa_finetuning#convert-pissa-to-lora"),
        ("corda", "CorDA", "corda_finetuning#convert-corda-to-lora"),
        ("olora", "OLoRA", "olora_finetuning#olora-and-lora"),
    ):
        if any(i.lower() == method or (method == "pissa" and i.startswith("pissa")) for i in inits):
            return (
                f"{name} changes the base weights of the model and should thus not be used with other adapters. "
                f"Consider converting the {name} adapter into a normal LoRA adapter: "
                f"https://github.com/huggingface/peft/tree/main/examples/{anchor}"
            )
    return None


def orthogonal_factors(r: int, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's "orthogonal" init (datta0.github.io/posts/rethink-lora-init): the odd and even rows of one random r×r
    orthogonal Q give A and B row spaces that are orthogonal, so B A = 0 while neither factor is zero. Draws the
    same random numbers, in the same order, as PEFT."""
    if r % 2:
        raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    A = torch.randn(n_in, r // 2).mm(Q[0::2]).T / 10.0  # A = Q_oddᵀ Xᵀ (r×in)
    B = torch.randn(r // 2, n_out).T.mm(Q[1::2]) / 10.0  # B = Y Q_even (out×r): B A = Y (Q_even Q_oddᵀ) Xᵀ = 0
    return A.contiguous(), B.contiguous()


class Magnitude(nn.Module):
    """DoRA's trained magnitude m (one entry per output) of one adapter, held as `.weight` so that parameter names
    are PEFT's (`lora_magnitude_vector.<adapter>.weight`)."""

    def __init__(self, m: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(m)


class LoraLayer(nn.Module):
    """y = base(x) + Σ_active s · B A dropout(x), with A r×in, B out×r and s = alpha/r (alpha/√r with rsLoRA).

    Holds any number of named adapters under PEFT's names: `lora_A[name]` / `lora_B[name]` are nn.Linear layers
    (lora_B with a bias when lora_bias=True), and for an Embedding base `lora_embedding_A[name]` (r×vocab) /
    `lora_embedding_B[name]` (dim×r) are plain parameters, since `A x` on token ids is a lookup into the columns of A.
    Which adapters run is read from the shared `AdapterState`.

    DoRA adapters (use_dora) also hold a magnitude m = `lora_magnitude_vector[name].weight` and compute
        W' = m · (W + s·B A) / ||W + s·B A||   (norm of each output's row of W, treated as a constant in backward),
    i.e. y = f ⊙ (W x + s·B A x) + b with f = m / ||W + s·B A||: the LoRA output rescaled per output feature.
    """

    def __init__(self, base_layer: nn.Module, state: AdapterState):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = layer_shape(base_layer)
        self.is_embedding = isinstance(base_layer, nn.Embedding)
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict(), nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}  # PEFT's name: factors a method keeps fixed
        self.state = state
        self._stacked: tuple = (None, None, None)  # (key, factors, source tensors) for mixed batches; see _stack
        # DoRA: ||W||² per output (W is frozen) and each adapter's norm, with the tensor versions they were computed
        # from, so a norm is computed once per optimizer step however many forwards (accumulation, checkpointing)
        # read it; and the norms used by merge, which unmerge needs back.
        self._w_sq: tuple = (None, None)
        self._norms: dict[str, tuple] = {}
        self._merged_norms: dict[str, torch.Tensor] = {}
        self._enabled: bool | None = None  # this layer switched on/off on its own (enable_adapters); None: the model's

    # PEFT's names of the per-adapter containers and settings (code written against PEFT walks them)
    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "lora_bias")

    # PEFT's layer attributes, read from the shared state
    @property
    def active_adapters(self) -> list[str]:
        return list(self.state.active)

    @property
    def active_adapter(self) -> str | list[str]:
        return self.state.active[0] if len(self.state.active) == 1 else list(self.state.active)

    @property
    def disable_adapters(self) -> bool:
        return self.state.disabled if self._enabled is None else not self._enabled

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's per-layer switch: this layer alone runs (its active adapters train) or passes the base through
        (its adapter tensors frozen). The model-level enable/disable_adapter_layers() resets it."""
        self._enabled = bool(enabled)
        for name in self.r:
            for p in self.adapter_params(name):
                p.requires_grad_(enabled and name in self.state.active)

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

    def adapter_params(self, name: str) -> list[nn.Parameter]:
        """Every trained tensor of adapter `name`: A, B, and lora_B's bias and DoRA's magnitude where it has them."""
        out = list(self.factors(name))
        if self.lora_bias.get(name):
            out.append(self.lora_B[name].bias)
        if name in self.lora_magnitude_vector:
            out.append(self.lora_magnitude_vector[name].weight)
        return out

    def add(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float,
        config: LoraConfig,
        fp32: bool = True,
        tied_to: LoraLayer | None = None,
        meta: bool = False,
    ) -> None:
        """Add adapter `name`; meta=True (PEFT's low_cpu_mem_usage) leaves its tensors unallocated on the meta device,
        to be replaced by loaded ones."""
        if config.lora_bias and self.is_embedding:
            raise ValueError("lora_bias=True is not supported for an Embedding base layer (as in PEFT)")
        if config.lora_bias and self.bias is None:
            warnings.warn(
                f"lora_bias=True on a {type(self.base_layer).__name__} without a bias: this adapter cannot be merged",
                stacklevel=4,
            )
        w = self.base_layer.weight
        # Half-precision and quantized bases get fp32 adapters, as PEFT's autocast_adapter_dtype=True gives them:
        # updates of size lr·grad vanish in bf16. fp32=False keeps a half-precision base's dtype.
        floating = w.dtype.is_floating_point and w.dtype.itemsize >= 2 and not is_quantized(self.base_layer)
        dtype = w.dtype if (w.dtype == torch.float64 or not fp32) and floating else torch.float32
        # meta=True leaves the adapter unallocated until loaded tensors replace it. A base on the meta device (sharded
        # loading, whose weights arrive later) gets real adapters, drawn now from the same RNG stream as a loaded base.
        kw = dict(device="meta" if meta else "cpu" if w.is_meta else w.device, dtype=dtype)
        self.scaling[name], self.r[name], self.lora_alpha[name] = config.scaling(r, alpha), r, alpha
        # Built as PEFT builds them (nn.Linear draws Kaiming-uniform, embeddings randn), so that a seeded script draws
        # the same numbers in both libraries; init=False keeps exactly these values.
        if self.is_embedding:
            A = nn.Parameter(torch.empty(r, self.in_features, **kw).normal_())
            B = nn.Parameter(torch.empty(self.out_features, r, **kw).normal_())
            self.lora_embedding_A[name], self.lora_embedding_B[name] = A, B
        else:
            self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)
            self.lora_B[name] = nn.Linear(r, self.out_features, bias=config.lora_bias, **kw)
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            if tied_to is not None:  # ensure_weight_tying: A, B become views of the embedding's factors
                A, B = self.tie(name, tied_to)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_bias[name], self.use_dora[name] = config.lora_bias, config.use_dora
        init = config.init_lora_weights
        kind = init.lower() if isinstance(init, str) else init
        if kind == "mica" and config.use_dora:
            raise ValueError("init_lora_weights='mica' cannot be combined with use_dora=True (as in PEFT)")
        with torch.no_grad():
            if init is False:
                pass
            elif kind == "mica":  # A = 0, B = the minor left singular vectors of W, frozen: only A trains
                A0, B0 = self.mica_factors(r)
                A.copy_(A0), B.copy_(B0)
                self.frozen_peft_weight_names[name] = ("lora_embedding_B" if self.is_embedding else "lora_B",)
                B.requires_grad_(False)
            elif self.is_embedding:  # embeddings: A = 0, B ~ N(0, 1) (PEFT does this for every other init too)
                nn.init.zeros_(A), nn.init.normal_(B)
            elif kind == "gaussian":
                nn.init.normal_(A, std=1 / r), nn.init.zeros_(B)
            elif is_principal_init(init):
                A0, B0 = self.principal_factors(init, r, self.scaling[name])
                A.copy_(A0), B.copy_(B0)
                self.set_base_weight(dense_weight(self.base_layer).float() - self.scaling[name] * self._layout(B0 @ A0))
            elif kind == "corda":
                A0, B0 = self.corda_factors(r, self.scaling[name])
                A.copy_(A0), B.copy_(B0)
                self.set_base_weight(dense_weight(self.base_layer).float() - self.scaling[name] * self._layout(B0 @ A0))
                del self.base_layer.eigens  # used once; PEFT drops it too, so it is never saved with the model
            elif kind == "orthogonal":
                A0, B0 = orthogonal_factors(r, self.in_features, self.out_features)
                # PEFT rounds them to a float base's dtype before any autocast to fp32; so do we, for equal numbers.
                rounded = w.dtype if w.dtype.is_floating_point else A.dtype  # a 4-bit base stores uint8
                A.copy_(A0.to(rounded)), B.copy_(B0.to(rounded))
            elif kind == "eva":  # PEFT: B = 0 and A keeps nn.Linear's draw; the data-driven step is a separate call
                nn.init.zeros_(B)
                warnings.warn(
                    "init_lora_weights='eva': the layers start as PEFT builds them before initialize_lora_eva_weights "
                    "(B = 0), which smolpeft does not implement; unless trained EVA weights are loaded into it, this "
                    "adapter trains as plain LoRA",
                    stacklevel=4,
                )
            else:  # True: A Kaiming-uniform, B = 0, so the adapter starts as the identity
                nn.init.kaiming_uniform_(A, a=math.sqrt(5)), nn.init.zeros_(B)
            if config.lora_bias and init is not False:
                nn.init.zeros_(self.lora_B[name].bias)
        if config.use_dora and meta:
            self.lora_magnitude_vector[name] = Magnitude(torch.empty(self.out_features, **kw))
        elif config.use_dora:  # m starts at ||W + s·B A||, so that W' = W + s·B A: DoRA starts where LoRA would
            m = self._row_norm(self._dense_weight(dtype), self.get_delta_weight(name).detach())
            self.lora_magnitude_vector[name] = Magnitude(m)

    def principal_factors(self, kind: str, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        """PiSSA (top-r SVD; "pissa_niter_N": torch's randomized SVD with N iterations) or OLoRA (QR) factors
        (A₀, B₀) of the base weight, with s·B₀A₀ its principal part.
        Pure: the caller decides whether the base becomes the residual W - s·B₀A₀."""
        if self.is_embedding or is_quantized(self.base_layer):
            raise ValueError(f"init_lora_weights={kind!r} needs a full-precision Linear or Conv1D base layer")
        Wm = self._layout(self.base_layer.weight.data).float()  # out×in
        if kind.lower() == "olora":  # OLoRA keeps Q and R unscaled (PEFT's definition), so the base loses s·Q_r R_r
            Q, R = torch.linalg.qr(Wm)
            return R[:r].contiguous(), Q[:, :r].contiguous()
        if kind == "pissa":
            U, S, Vh = torch.linalg.svd(Wm, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:  # random projections: the top r only approximately, as in PEFT (and as random as its draw)
            U, S, V = torch.svd_lowrank(Wm, r, niter=int(kind.split("_niter_")[1]))
            Vh = V.T
        root = S.sqrt() / math.sqrt(s)  # s·B₀A₀ = U S Vh: each factor carries √(S/s)
        return (root[:, None] * Vh).contiguous(), (U * root).contiguous()

    def mica_factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """MiCA (minor component adaptation): A₀ = 0 and B₀ = the r left singular vectors of W (out×in) with the
        smallest singular values. B₀A₀ = 0, so the base is not touched; training moves A within that subspace."""
        w = self.base_layer.weight
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16) or is_quantized(self.base_layer):
            raise TypeError("Please initialize MiCA under float32, float16, or bfloat16.")
        Wm = self._layout(w.data).float()
        if r > min(Wm.shape):
            what = "min(num_embeddings, embedding_dim)" if self.is_embedding else "min(in_features, out_features)"
            raise ValueError(
                f"MiCA requires `r` <= {what} but got r={r} for a layer with weight shape {tuple(w.shape)} "
                f"(max usable r is {min(Wm.shape)})."
            )
        U = torch.linalg.svd(Wm, full_matrices=False)[0]
        # PEFT stores them in the base dtype first (then autocasts); round the same way for equal numbers.
        return Wm.new_zeros(r, Wm.shape[1]).to(w.dtype), U[:, -r:].to(w.dtype).contiguous()

    def corda_factors(self, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        """CorDA: A₀ = √(S/s)·Vᵀ, B₀ = U·√(S/s) from the context-oriented SVD that `preprocess_corda` left on the base
        layer (`eigens`: U out×r, S r, V in×r), so that s·B₀A₀ = U S Vᵀ."""
        eig = getattr(self.base_layer, "eigens", None)
        if eig is None:
            raise ValueError(
                "`eigens` attribute not found for layer, please run `preprocess_corda` first. "
                "More information can be found at examples/corda_finetuning/README.md."
            )
        w = self.base_layer.weight
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16) or is_quantized(self.base_layer):
            raise TypeError(
                "Please initialize CorDA under float32, float16, or bfloat16. "
                "Subsequently, re-quantize the residual model to help minimize quantization errors."
            )
        U, S, V = eig.U_WC, eig.S_WC, eig.V_WC
        for label, t in (("S", S), ("U", U), ("V", V)):
            if not torch.isfinite(t).all():
                raise ValueError(f"Invalid value found in matrix {label} (CorDA's decomposition is not finite).")
        hint = (
            "Please make sure the `lora_config` and `model` argument of `preprocess_corda` is consistent with "
            "`get_peft_model`. If you're using cache in `preprocess_corda`, please make sure the cache is built with "
            "the same model and LoRA rank."
        )
        if U.shape != (self.out_features, r):
            raise ValueError(f"Matrix U size mismatch: {U.size()} vs. ({self.out_features}, {r}). {hint}")
        if S.shape != (r,):
            raise ValueError(f"Matrix S size mismatch: {S.size()} vs. ({r},). {hint}")
        if V.shape != (self.in_features, r):
            raise ValueError(f"Matrix V size mismatch: {V.size()} vs. ({self.in_features}, {r}). {hint}")
        root = (S.float() / s).sqrt()
        return (V.float().T * root[:, None]).contiguous(), (U.float() * root).contiguous()

    def frozen_params(self, name: str) -> list[nn.Parameter]:
        """Tensors of adapter `name` that its method keeps fixed (MiCA's B): never trained, even when active."""
        out = []
        for attr in self.frozen_peft_weight_names.get(name, ()):
            t = getattr(self, attr)[name]
            out += list(t.parameters()) if isinstance(t, nn.Module) else [t]
        return out

    def tie(self, name: str, source: LoraLayer) -> tuple[nn.Parameter, nn.Parameter]:
        """Share adapter `name` with the embedding layer `source` whose weight is ours transposed (a tied LM head):
        our A is B_embᵀ and our B is A_embᵀ, views of the same storage, so the two layers hold one ΔW. Called by
        `add` before the init, which then writes through the views, as PEFT's does."""
        eA, eB = source.factors(name)
        A, B = self.factors(name)
        if self.is_embedding or A.shape != eB.T.shape or B.shape != eA.T.shape:
            raise ValueError(
                f"ensure_weight_tying: adapter {name!r} of the tied layer has A {tuple(A.shape)}, B {tuple(B.shape)}; "
                f"the input embedding's transposed factors are {tuple(eB.T.shape)}, {tuple(eA.T.shape)} "
                "(tied layers need the same r)"
            )
        self.lora_A[name].weight = nn.Parameter(eB.data.T)
        self.lora_B[name].weight = nn.Parameter(eA.data.T)
        self._tied = {**getattr(self, "_tied", {}), name: source}
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _merged_through_tie(self, name: str) -> bool:
        """True when adapter `name` is tied to an embedding whose base weight is ours: the embedding's merge adds the
        one shared ΔW, so ours must not add it a second time."""
        source = getattr(self, "_tied", {}).get(name)
        return source is not None and source.base_layer.weight.data_ptr() == self.base_layer.weight.data_ptr()

    def _layout(self, w: torch.Tensor) -> torch.Tensor:
        """Between LoRA's out×in view and the base's storage (transposed for Conv1D and Embedding)."""
        return w.T if self.fan_in_fan_out else w

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s · B A, laid out like the base weight, in the adapter's (fp32) dtype."""
        A, B = self.factors(name)
        return self._layout(B @ A) * self.scaling[name]

    # --- DoRA ----------------------------------------------------------------------------------------------------

    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight in its storage layout, dequantized if need be, in `dtype`."""
        return dense_weight(self.base_layer).to(dtype)

    def _row_norm(self, W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """||W + ΔW|| for each output feature (W and ΔW laid out like the base weight): the direct computation,
        for adding and merging an adapter."""
        return torch.linalg.norm(W + delta, dim=0 if self.fan_in_fan_out else 1)

    def _per_output(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output vector shaped to scale the base weight in its storage layout."""
        return v[None, :] if self.fan_in_fan_out else v[:, None]

    def weight_norm(self, name: str) -> torch.Tensor:
        """||W + s·B A|| per output, without forming any out×in matrix (detached; cached until A, B or W change):
            ||W_i + s(BA)_i||² = ||W_i||² + 2s·Σ_k B_ik (W Aᵀ)_ik + s²·B_i (A Aᵀ) B_iᵀ,
        with ||W_i||² cached (W is frozen) and W Aᵀ one rank-r product per step."""
        A, B = self.factors(name)
        W = self.base_layer.weight
        s = self.scaling[name]
        key = (A.data_ptr(), A._version, B.data_ptr(), B._version, W.data_ptr(), W._version, s, A.dtype)
        cached = self._norms.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        # In fp32 at least, and outside autocast: the norm of a half-precision sum would carry its rounding into m.
        dtype = torch.promote_types(A.dtype, torch.float32)
        with torch.no_grad(), torch.autocast(A.device.type, enabled=False):
            A, B = A.detach().to(dtype), B.detach().to(dtype)
            Wd = self._dense_weight(dtype)
            wkey = (W.data_ptr(), W._version, dtype)
            if self._w_sq[0] != wkey:
                self._w_sq = (wkey, Wd.square().sum(0 if self.fan_in_fan_out else 1))
            WA = A @ Wd if self.fan_in_fan_out else F.linear(A, Wd)  # (W Aᵀ)ᵀ, r×out
            cross = (B * WA.T).sum(1)
            ba_sq = ((B @ (A @ A.T)) * B).sum(1)
            norm = (self._w_sq[1] + 2 * s * cross + s * s * ba_sq).clamp_min(0).sqrt()
        self._norms[name] = (key, norm)
        return norm

    def _dora_add(self, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """out (W x + b plus any adapters before this one, as in PEFT) ↦ f ⊙ (out - b + s·B A x) + b."""
        A, B = self.factors(name)
        f = (self.lora_magnitude_vector[name].weight / self.weight_norm(name)).to(A.dtype)
        s, drop = self.scaling[name], self.lora_dropout[name]
        y = out.to(A.dtype)
        if self.is_embedding:
            return (f * (y + self._delta(x, name))).to(out.dtype)
        b = self.bias
        xa = x.to(A.dtype)
        if self.training and not isinstance(drop, nn.Identity):
            # With dropout the rescaled base term is W·dropout(x), not out: one more product with W, as in PEFT.
            xa = drop(xa)
            Wd = self._dense_weight(A.dtype)
            base = xa @ Wd if self.fan_in_fan_out else F.linear(xa, Wd)
            return (y + (f - 1) * base + f * s * F.linear(F.linear(xa, A), B)).to(out.dtype)
        h = F.linear(xa, A)
        flat, h = y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1])
        if torch.is_grad_enabled():
            g = torch.addmm(flat - b if b is not None else flat, h, (B * s).T) * f
            g = g + b if b is not None else g
        else:  # inference: f ⊙ (out - b) + b = f ⊙ out + (1 - f) b, in place; f folded into the r×out factor
            f = f.detach()
            flat.mul_(f)
            if b is not None:
                flat.add_((1 - f) * b)
            g = flat.addmm_(h, (B * (s * f)[:, None]).T)
        return g.view(out.shape).to(out.dtype)

    def set_base_weight(self, new: torch.Tensor) -> None:
        """Replace the base weight by `new` (laid out like it), re-quantizing a 4-bit or 8-bit base."""
        if is_quantized(self.base_layer):
            set_dense_weight(self.base_layer, new)
        else:
            self.base_layer.weight.data = new.to(self.base_layer.weight.dtype)

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.factors(name)
        if self.is_embedding:
            delta = F.embedding(x, A.T, padding_idx=self.base_layer.padding_idx) @ B.T * self.scaling[name]
            # Scaled embeddings (Gemma's embed_scale) scale their output, so the rows of ΔW are scaled too, as they are
            # once merged into W.
            embed_scale = getattr(self.base_layer, "embed_scale", None)
            return delta if embed_scale is None else delta * embed_scale.to(delta.dtype)
        bias = self.lora_B[name].bias  # None unless lora_bias
        return F.linear(F.linear(self.lora_dropout[name](x.to(A.dtype)), A), B, bias) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        st = self.state
        if self.disable_adapters or self.merged_adapters:
            return out
        if st.row_adapters is not None:
            return self._mixed_forward(x, out, st.row_adapters)
        for name in st.active:
            if name in self.r:
                out = self._add_delta(out, x, name)
        return out

    def _add_delta(self, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.use_dora[name]:
            return self._dora_add(out, x, name)
        A, B = self.factors(name)
        if self.is_embedding or out.dtype != B.dtype or self.lora_bias[name]:
            return out + self._delta(x, name).to(out.dtype)
        h = F.linear(self.lora_dropout[name](x.to(A.dtype)), A)
        # s·B folds the scaling into the small r×out factor, and the product is added to out in one kernel, in
        # place: out is the base layer's fresh output, which nothing else holds and whose backward does not need it,
        # so autograd records the add without a second out-sized tensor (a step's peak memory holds one per layer).
        # Under autograd only over nn.Linear, whose output is a plain tensor; an in-place op on a view (Conv1D's
        # reshaped output) costs more in backward than the copy saves, and a custom Function's output may be a view.
        Bs = (B * self.scaling[name]).T
        if not torch.is_grad_enabled():
            flat = out.reshape(-1, out.shape[-1])
            return flat.addmm_(h.reshape(-1, h.shape[-1]), Bs).view(out.shape)
        if type(self.base_layer) is nn.Linear and out.dim() == 3:
            return out.baddbmm_(h, Bs.expand(out.shape[0], *Bs.shape))
        if type(self.base_layer) is nn.Linear and out.dim() == 2:
            return out.addmm_(h, Bs)
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), Bs).view(out.shape)

    def _mixed_forward(self, x: torch.Tensor, out: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Each row of the batch gets its own adapter (or none)."""
        names = expand_rows(names, x.shape[0])
        present = [n for n in dict.fromkeys(names) if n in self.r]  # BASE and adapters not on this layer: none
        if not present:
            return out
        grouped = self.is_embedding or self.training or torch.is_grad_enabled() or len({self.r[n] for n in present}) > 1
        if grouped or any(self.lora_bias[n] for n in present):
            # Grouped: each adapter runs once on its rows (dropout, gradients and unequal ranks stay exact).
            out = out.clone()
            for name in present:
                rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
                out[rows] = self._add_delta(out[rows], x[rows], name)
            return out
        # Inference with equal ranks: gather each row's factors and run two batched matmuls for the whole batch,
        # the second accumulating into the base output in place. Rows without an adapter gather a zero factor.
        # DoRA rows first rescale their base output: f ⊙ out + (1 - f) b (f = 1 and no offset for the other rows).
        A, B, f, offset = self._stack(present)
        slot = torch.tensor([present.index(n) if n in present else len(present) for n in names], device=x.device)
        xb = x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype)
        h = torch.bmm(xb, A[slot].transpose(1, 2))
        o = out.reshape(x.shape[0], -1, out.shape[-1]).to(B.dtype)  # inference only: out is ours to overwrite
        if f is not None:
            o.mul_(f[slot][:, None])
            if offset is not None:
                o.add_(offset[slot][:, None])
        o.baddbmm_(h, B[slot].transpose(1, 2))
        return o.view(out.shape).to(out.dtype)

    def _stack(self, present: list[str]) -> tuple:
        """(k+1)×r×in A's and (k+1)×out×r scaled B's of the present adapters plus a zero slot, and for DoRA the
        (k+1)×out factors f = m / ||W + s·B A|| (folded into the B's as well) and offsets (1 - f) b; rebuilt only when
        an adapter's tensors change (in-place updates bump the tensor version, reloads replace the tensor)."""
        tensors = [t for n in present for t in self.adapter_params(n)]
        key = (
            tuple(present),
            tuple(id(t) for t in tensors),
            tuple(t._version for t in tensors),
            tuple(self.scaling[n] for n in present),
            id(self.base_layer.weight),
            self.base_layer.weight._version,
        )
        if self._stacked[0] != key:
            with torch.no_grad():
                As = [self.factors(n)[0] for n in present]
                ones = As[0].new_ones(self.out_features)
                fs = [
                    (self.lora_magnitude_vector[n].weight / self.weight_norm(n)).to(ones.dtype)
                    if self.use_dora[n]
                    else ones
                    for n in present
                ]
                Bs = [self.factors(n)[1] * (self.scaling[n] * f)[:, None] for n, f in zip(present, fs)]
                f = torch.stack([*fs, ones]) if any(self.use_dora[n] for n in present) else None
                b = self.bias
                offset = None if f is None or b is None else (1 - f) * b.to(f.dtype)
                stacked = (
                    torch.stack([*As, torch.zeros_like(As[0])]),
                    torch.stack([*Bs, torch.zeros_like(Bs[0])]),
                    f,
                    offset,
                )
            # The tensors are kept with the key so that their ids cannot be reused by new tensors while cached.
            self._stacked = (key, stacked, tensors)
        return self._stacked[1]

    def merge(self, name: str, safe: bool = False) -> None:
        """W ← W + ΔW (DoRA: W ← f ⊙ (W + ΔW)), and b ← b + s·b_B with lora_bias. The fp32 ΔW is added in place, so
        a half-precision W is rounded once, as PEFT rounds it."""
        if name in self.merged_adapters or name not in self.r:
            return
        if self._merged_through_tie(name):
            self.merged_adapters.append(name)
            return
        if self.lora_bias[name] and self.bias is None:
            raise RuntimeError(f"cannot merge adapter {name!r}: it has lora_bias=True but the base layer has no bias")
        delta = self.get_delta_weight(name).detach()
        quantized = is_quantized(self.base_layer)
        W = dense_weight(self.base_layer) if quantized else self.base_layer.weight.data
        if self.use_dora[name]:
            # The norm is that of the base without the adapters merged before this one, as forward computes it.
            norm = self._row_norm(self._unmerged_weight(delta.dtype), delta)
            f = self._per_output(self.lora_magnitude_vector[name].weight.detach() / norm)
            new = (W.to(delta.dtype) + delta) * f
        else:
            new = W.to(delta.dtype) + delta if quantized else (W.clone() if safe else W).add_(delta)
        bias = self.bias.data + self.scaling[name] * self.lora_B[name].bias.detach() if self.lora_bias[name] else None
        if safe and not (torch.isfinite(new).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {name} seems to be broken "
                "(the layer was left unmerged)"
            )
        if quantized or safe or self.use_dora[name]:
            self.set_base_weight(new)
        if bias is not None:
            self.bias.data = bias.to(self.bias.dtype)
        if self.use_dora[name]:
            self._merged_norms[name] = norm
        self.merged_adapters.append(name)

    def _unmerged_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """A copy of the base weight with the merged adapters taken out again, last merged first."""
        W = self._dense_weight(dtype).clone()
        for name in reversed(self.merged_adapters):
            W = self._take_out(W, name)
        return W

    def _take_out(self, W: torch.Tensor, name: str) -> torch.Tensor:
        """The weight before merged adapter `name` went in: W - ΔW, or W / f - ΔW for DoRA."""
        delta = self.get_delta_weight(name).detach()
        if self.use_dora[name]:
            W = W / self._per_output(self.lora_magnitude_vector[name].weight.detach() / self._merged_norms[name])
        return W.to(delta.dtype) - delta

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            if self._merged_through_tie(name):
                pass
            elif is_quantized(self.base_layer) or self.use_dora[name]:
                self.set_base_weight(self._take_out(dense_weight(self.base_layer), name))
            else:
                self.base_layer.weight.data.sub_(self.get_delta_weight(name).detach())
            if self.lora_bias[name]:
                self.bias.data -= (self.scaling[name] * self.lora_B[name].bias.detach()).to(self.bias.dtype)
            self._merged_norms.pop(name, None)
            self.merged_adapters.pop()

    def delete(self, name: str) -> None:
        for d in (
            self.lora_A,
            self.lora_B,
            self.lora_embedding_A,
            self.lora_embedding_B,
            self.lora_dropout,
            self.lora_magnitude_vector,
        ):
            _discard(d, name)
        for d in (self.scaling, self.r, self.lora_alpha, self.use_dora, self.lora_bias, self._norms):
            d.pop(name, None)
        self.frozen_peft_weight_names.pop(name, None)
        getattr(self, "_tied", {}).pop(name, None)
        self._stacked = (None, None, None)  # the stack may hold this adapter's tensors: let them go with it

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}, merged={self.merged_adapters}"

    def __repr__(self) -> str:
        """PEFT's layer names: lora.Linear (also for Conv1D), lora.Embedding, lora.Linear4bit, lora.Linear8bitLt."""
        kind = "Embedding" if self.is_embedding else "Linear"
        if is_quantized(self.base_layer):
            kind = type(self.base_layer).__name__
        return f"lora.{kind}" + super().__repr__().removeprefix(type(self).__name__)


class ModulesToSave(nn.Module):
    """A whole module trained in full (a classifier head, say): one copy per adapter, the original kept frozen."""

    adapter_layer_names: tuple[str, ...] = ()  # as PEFT's wrapper: none of LoRA's per-adapter containers
    other_param_names: tuple[str, ...] = ()

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
    def _adapters(self) -> set[str]:  # PEFT's AuxiliaryTrainingWrapper registry
        return set(self.modules_to_save)

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
        if not isinstance(first, torch.Tensor):  # rows of a tuple (a GRU's output and state) cannot be put back
            raise TypeError(
                "Mixed batching is only supported for the following modules: Linear, Embedding, Conv1d, Conv2d, "
                f"Conv3d. (smolpeft also mixes any module returning one tensor; {type(self.original_module).__name__} "
                f"returns {type(first).__name__})"
            )
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
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(names)} and {batch} respectively."
        )
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
            layers = config.layers_to_transform  # an int (one layer, kept as given, as PEFT keeps it) or a list
            return int(m.group(1)) in ([layers] if isinstance(layers, int) else layers)
    return False


def _user_modules(model: nn.Module):
    """named_modules() without the insides of our own wrappers."""
    for name, m in model.named_modules():
        if re.search(
            r"(^|\.)(base_layer|lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_dropout|lora_magnitude_vector|original_module|modules_to_save)(\.|$)",
            name,
        ):
            continue
        yield name, m


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules `config` puts LoRA on; raises with real module names when nothing matches."""
    spec = config.target_modules
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"no default target_modules for model_type={model_type!r}: Please specify `target_modules` in "
                "`peft_config` "
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
                f"target module {name!r} is a {type(base).__name__}; "
                "LoRA supports Linear, Conv1D, Embedding, Linear4bit"
            )
        names.append(name)
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in _user_modules(model) if _is_adaptable(m)})
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}; "
            f"layer names it has: {', '.join(leaves[:30])}"
        )
    return names


def pattern_value(name: str, patterns: dict, default: Any) -> Any:
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?{p}$", name):
            return v
    return default


def inject(
    model: nn.Module, config: LoraConfig, name: str, state: AdapterState, fp32: bool = True, meta: bool = False
) -> list[str]:
    """Wrap every target layer in a LoraLayer (once) and add adapter `name` to it (on the meta device: `meta`)."""
    targets = resolve_targets(model, config)
    tied = getattr(config, "target_modules_to_tie", None) or []
    if tied:  # modules tied to the input embedding come last, after the embedding's adapter exists (as in PEFT)
        tied = [p for p, _ in _user_modules(model) if p and _is_tied_key(p, tied)]
        targets = [p for p in targets if p not in tied] + tied
    for path in targets:
        layer = model.get_submodule(path)
        if not isinstance(layer, LoraLayer):
            layer = LoraLayer(layer, state)
            model.set_submodule(path, layer)
        r = pattern_value(path, config.rank_pattern, config.r)
        alpha = pattern_value(path, config.alpha_pattern, config.lora_alpha)
        source = None
        if path in tied and not layer.is_embedding:  # an embedding tied to the embedding gets its own, as in PEFT
            source = model.get_submodule(input_embedding_path(model))
            if not isinstance(source, LoraLayer) or name not in source.lora_embedding_A:
                raise ValueError(f"ensure_weight_tying: the input embedding has no LoRA adapter {name!r} to tie to")
        layer.add(name, r, alpha, config.lora_dropout, config, fp32=fp32, tied_to=source, meta=meta)
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
    return [
        m.modules_to_save[name]
        for _, m in model.named_modules()
        if isinstance(m, ModulesToSave) and name in m.modules_to_save
    ]


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


# --- weight tying (LoraConfig.ensure_weight_tying) -------------------------------------------------------------

EMBEDDING_LAYER_NAMES = ["embed_tokens", "lm_head"]  # PEFT's leaf names that may be tied to the input embedding

_WEIGHT_TYING_ISSUE = (
    "This can lead to complications, for example when merging the adapter "
    "or converting your model to formats other than safetensors. "
    "Check the discussion here: https://github.com/huggingface/peft/issues/2777"
)


def _plain_name(name: str) -> str:
    """A parameter or module name as it was before our wrappers were put in."""
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def tied_module_names(model: nn.Module) -> list[str]:
    """Full names of the modules whose weight is tied to the input embedding, read from `_tied_weights_keys` as PEFT
    reads them: a list (transformers 4) or a target -> source dict (transformers 5, sub-modules' entries included).
    Empty when the config says tie_word_embeddings=False: that checkpoint has untied weights."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", None) is False:
        return []
    keys = getattr(model, "_tied_weights_keys", None)
    if not keys:
        return []
    if isinstance(keys, dict):
        if not hasattr(model, "get_input_embeddings"):
            raise ValueError(
                "The supplied model implements `_tied_weights_keys` as a dict but doesn't implement "
                "'get_input_embeddings' so we can't determine which weights are tied to embeddings."
            )
        pairs: dict[str, str] = {}
        for path, m in model.named_modules():
            sub = getattr(m, "_tied_weights_keys", None)
            if isinstance(sub, dict):
                pairs.update({(f"{path}.{k}" if path else k): (f"{path}.{v}" if path else v) for k, v in sub.items()})
        own = {id(p) for p in model.get_input_embeddings().parameters()}
        # every name the embedding's weight goes by, so a tie whose source is an alias still counts
        sources = {_plain_name(n) for n, p in model.named_parameters(remove_duplicate=False) if id(p) in own}
        names = [_plain_name(k) for k, v in pairs.items() if _plain_name(v) in sources]
    else:
        names = [_plain_name(k) for k in keys]
    return sorted({n.rpartition(".")[0] for n in names})


def input_embedding_path(model: nn.Module) -> str:
    """The module path of `model.get_input_embeddings()` ("" if it is not in the model)."""
    emb = model.get_input_embeddings()
    return next((n for n, m in model.named_modules() if m is emb), "")


def plan_weight_tying(model: nn.Module, config: LoraConfig) -> None:
    """PEFT's checks of tied layers (its warnings included). With ensure_weight_tying and a tied base, the adapter
    moves from the tied modules to the input embedding in the config (modules_to_save or target_modules, which is
    what gets saved), and the tied modules are recorded in `config.modules_to_tie` / `config.target_modules_to_tie`:
    they are then wrapped last, sharing the embedding's trained tensors."""
    modules_to_save = list(config.modules_to_save or [])
    embedding_to_save = any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in modules_to_save)
    spec = config.target_modules
    if isinstance(spec, str):
        embedding_in_target = any(re.fullmatch(spec, m) for m in EMBEDDING_LAYER_NAMES)
    else:
        embedding_in_target = any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in spec or [])
    tied = tied_module_names(model)
    if not config.ensure_weight_tying:
        if (embedding_to_save or embedding_in_target) and tied:
            warnings.warn(
                "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, "
                "but `ensure_weight_tying` is not set to True. " + _WEIGHT_TYING_ISSUE,
                stacklevel=4,
            )
        return
    if not tied:
        warnings.warn(
            "You have requested `ensure_weight_tying`, but no tied modules were found in the model", stacklevel=4
        )
        return
    if not (embedding_to_save or embedding_in_target):
        warnings.warn(
            "You have requested `ensure_weight_tying`, but no tied modules are added in either "
            "`modules_to_save` or `target_modules`",
            stacklevel=4,
        )
        return
    if config.use_dora or config.init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(
            f"ensure_weight_tying=True with use_dora={config.use_dora}, init_lora_weights={config.init_lora_weights!r} "
            "is not supported by smolpeft (tied adapters support plain LoRA with init True, False or 'gaussian')"
        )
    emb = input_embedding_path(model)

    def untie(names: list[str]) -> list[str]:
        # the embedding carries the adapter; each tied module drops the first entry naming it (PEFT's rule)
        names = names + ([emb] if emb not in names else [])
        for key in tied:
            hit = next((m for m in names if re.match(rf"(^|.*\.){m}($|\..*)", key)), None)
            if hit is not None:
                names.remove(hit)
        return names

    if embedding_to_save:
        config.modules_to_tie = tied
        config.modules_to_save = untie(modules_to_save)
    elif isinstance(spec, str):
        config.target_modules_to_tie = tied
        config.target_modules = rf"(?:{spec}|^{re.escape(emb)}$)"
    else:
        config.target_modules_to_tie = tied
        config.target_modules = sorted(untie(sorted(set(spec))))


def _is_tied_key(path: str, tied: list[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in tied)


def tie_modules_to_save(model: nn.Module, tied: list[str], name: str, state: AdapterState) -> None:
    """Wrap each module tied to the input embedding so that adapter `name`'s copy shares the weight of the
    embedding's trained copy (one tensor, trained once, saved under both names as in PEFT)."""
    source = model.get_submodule(input_embedding_path(model))
    if not isinstance(source, ModulesToSave) or name not in source.modules_to_save:
        raise ValueError(f"ensure_weight_tying: the input embedding has no trained copy for adapter {name!r}")
    weight = source.modules_to_save[name].weight
    for path, m in list(_user_modules(model)):
        if path and _is_tied_key(path, tied) and not isinstance(m, LoraLayer):
            if not isinstance(m, ModulesToSave):
                m = ModulesToSave(m, state)
                model.set_submodule(path, m)
            # deepcopy maps the original (tied) weight to the trained one: bias and module type are kept
            m.modules_to_save[name] = copy.deepcopy(m.original_module, {id(m.original_module.weight): weight})
            m.modules_to_save[name].requires_grad_(True)


# --- target_parameters (LoRA on a module's nn.Parameter): checked, not implemented ------------------------------


def matched_parameters(model: nn.Module, targets: list[str]) -> list[str]:
    """`module.param` names that `target_parameters` matches (exact or dotted suffix, PEFT's rule), each parameter
    named by the lowest module holding it."""
    found = []
    for path, m in model.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            key = f"{_plain_name(path + '.')}{pname}" if path else pname
            if key in targets or any(key.endswith("." + t) for t in targets):
                found.append(key)
    return found


def check_target_parameters(model: nn.Module, config: LoraConfig) -> None:
    """target_parameters is accepted only where it would adapt nothing: PEFT's error when nothing at all is targeted,
    its warning when only the modules match; a parameter it does match is refused (smolpeft has no ParamWrapper)."""
    if not config.target_parameters:
        return
    found = matched_parameters(model, config.target_parameters)
    if found and config.target_modules:
        try:
            targeted = set(resolve_targets(model, config))
        except (TypeError, ValueError):  # the module side fails with its own error when injected
            targeted = set()
        for key in found:
            path = key.rpartition(".")[0]
            if path in targeted:
                raise ValueError(
                    f"Trying to wrap an `nn.Parameter` of layer '{path}' of type "
                    f"{type(model.get_submodule(path)).__name__}, which is not a valid target. Make sure that this "
                    "layer is not also targeted with `target_modules`."
                )
    if found:
        raise ValueError(
            f"LoraConfig: target_parameters={config.target_parameters!r} matches {found[:3]}; LoRA on an nn.Parameter "
            "(target_parameters) is not supported by smolpeft: target the modules with target_modules instead"
        )
    spec = config.target_modules
    no_default = spec is None and getattr(getattr(model, "config", None), "model_type", None) not in DEFAULT_TARGETS
    if no_default or (spec is not None and not spec):
        raise ValueError(
            "No `target_modules` passed but also no `target_parameters` found. Please check the values for "
            "these arguments."
        )
    warnings.warn(
        f"target_parameters={config.target_parameters} were set but no parameter was matched.",
        RuntimeWarning,
        stacklevel=4,
    )
