"""LoraModel: a transformers model with LoRA adapters injected, and the operations on them (PEFT's `base_model`).

In PEFT's object graph `PeftModel.base_model` is this tuner and `PeftModel.base_model.model` the transformers model,
so parameter names read `base_model.model.<path>.lora_A.<adapter>.weight`. Every LoRA layer of the model reads one
shared `AdapterState`, so switching, disabling and mixed batches never walk the layers.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from . import lora
from .config import LoraConfig, TaskType
from .lora import AdapterState, LoraLayer, ModulesToSave

CLS_HEADS = ["classifier", "score"]  # PEFT trains the classification head with every SEQ_CLS adapter
# The heads each task's adapters train and save with them, as PEFT's task classes add them to modules_to_save.
TASK_HEADS = {
    TaskType.SEQ_CLS.value: CLS_HEADS,
    TaskType.TOKEN_CLS.value: CLS_HEADS,
    TaskType.QUESTION_ANS.value: ["qa_outputs"],
}


def check_known(peft_config: dict, name: str) -> None:
    """Raise PEFT's error for an adapter name that is not in the registry `peft_config`."""
    if name not in peft_config:
        raise ValueError(f"Adapter {name} does not exist; known adapters: {', '.join(peft_config) or '(none)'}")


def check_new(peft_config: dict, name: str) -> None:
    """Raise for a name that cannot take a new adapter: one already in the registry, or BASE (no adapter)."""
    if name in peft_config:
        raise ValueError(f"Adapter with name {name!r} already exists; delete_adapter() it first or pick another name")
    if name == lora.BASE:
        raise ValueError(f"{lora.BASE!r} is reserved for 'no adapter' in mixed batches")


class LoraModel(nn.Module):
    """Adds, switches, merges and removes named LoRA adapters on `model` (modified in place)."""

    prefix = "lora_"

    def __init__(
        self,
        model: nn.Module,
        peft_config: LoraConfig | dict[str, LoraConfig],
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.targeted_module_names: list[str] = []
        self._state = AdapterState(active=[adapter_name])
        self._autocast = autocast_adapter_dtype
        # As PEFT: the injected model carries the registry too, so a bare model from inject_adapter_in_model works with
        # get/set_peft_model_state_dict; unload() takes it away again.
        model.peft_config = self.peft_config
        configs = peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config}
        for name, config in configs.items():
            self.add_adapter(name, config, low_cpu_mem_usage=low_cpu_mem_usage)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not built yet (copy, unpickling): don't recurse
                raise
            return getattr(self.model, name)

    # --- adapters ---------------------------------------------------------------------------------------------

    def add_adapter(
        self,
        adapter_name: str,
        config: LoraConfig,
        autocast_adapter_dtype: bool | None = None,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Inject adapter `adapter_name`; a failure leaves the model as it was. low_cpu_mem_usage: its LoRA tensors
        stay on the meta device until loaded (checkpoint.copy_into puts real tensors in their place)."""
        if autocast_adapter_dtype is not None:
            self._autocast = autocast_adapter_dtype
        check_new(self.peft_config, adapter_name)
        msg = lora.base_rewrite_warning(config, list(self.peft_config.values()))
        if msg:
            warnings.warn(msg, stacklevel=3)
        if adapter_name in self.prefix:  # "lora", "ora_": keys of such an adapter are ambiguous in PEFT's loader
            warnings.warn(
                f"Adapter name '{adapter_name}' should not be contained in the prefix '{self.prefix}'. "
                "This may lead to reinitialization of the adapter weights during loading.",
                stacklevel=3,
            )
        self.peft_config[adapter_name] = config
        try:
            lora.check_target_parameters(self.model, config)
            lora.plan_weight_tying(self.model, config)  # may move tied modules to the input embedding in config
            heads = list(config.modules_to_save or [])
            heads += [h for h in TASK_HEADS.get(config.task_type, []) if h not in heads]
            if heads:
                lora.add_modules_to_save(self.model, heads, adapter_name, self._state)
            if getattr(config, "modules_to_tie", None):
                lora.tie_modules_to_save(self.model, config.modules_to_tie, adapter_name, self._state)
            targets = lora.inject(
                self.model, config, adapter_name, self._state, fp32=self._autocast, meta=low_cpu_mem_usage
            )
        except BaseException:
            self._drop(adapter_name)
            raise
        self.targeted_module_names = sorted(set(self.targeted_module_names) | set(targets))
        if not any(a in self.peft_config for a in self._state.active):
            self._state.active = [adapter_name]
        self._mark_trainable(freeze_base=True)

    def _drop(self, name: str) -> None:
        self.peft_config.pop(name, None)
        for _, m in lora.lora_layers(self.model):
            m.delete(name)
        lora.delete_modules_to_save(self.model, name)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        merged = sorted({n for _, m in lora.lora_layers(self.model) for n in m.merged_adapters} & {adapter_name})
        if merged:
            raise ValueError(f"Cannot delete adapter(s) {merged} while they are merged. Please unmerge them first.")
        self._drop(adapter_name)
        active = [a for a in self._state.active if a != adapter_name]
        self._state.active = active or list(self.peft_config)[:1]
        self._mark_trainable()

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make these adapters active (several: their deltas add up); only active adapters train, and none with
        inference_mode=True (PEFT's keyword)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            self._check_known(n)
        for _, m in self.model.named_modules():  # a trained copy of a module is one adapter's, never a sum
            both = [n for n in names if isinstance(m, ModulesToSave) and n in m.modules_to_save]
            if len(both) > 1:
                raise ValueError(
                    f"Only one adapter can be set at a time for ModulesToSaveWrapper, got {len(both)} {both}"
                )
        self._state.active = names
        self._mark_trainable()
        if inference_mode:
            for n in names:
                for p in self.adapter_parameters(n):
                    p.requires_grad_(False)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._state.active)

    @property
    def active_adapter(self) -> str | list[str]:
        a = self._state.active
        return a[0] if len(a) == 1 else list(a)

    def disable_adapter_layers(self) -> None:
        """Every layer computes the base again and no adapter tensor trains (PEFT's rules), until enabled."""
        for name in self.active_adapters:
            bias = getattr(self.peft_config.get(name), "bias", "none")
            if bias != "none":  # the trained base biases stay: the output is not the base model's
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the same "
                    "output as the base model would without adaption.",
                    stacklevel=2,
                )
        self._state.disabled = True
        for _, m in lora.lora_layers(self.model):
            m._enabled = None  # the model-level switch overrides a layer's own
        for name in self.peft_config:
            for p in self.adapter_parameters(name):
                p.requires_grad_(False)

    def enable_adapter_layers(self) -> None:
        self._state.disabled = False
        for _, m in lora.lora_layers(self.model):
            m._enabled = None
        self._mark_trainable()

    def _check_known(self, name: str) -> None:
        check_known(self.peft_config, name)

    def _move_adapter_to_base_device(self, name: str) -> None:
        """Put adapter `name`'s LoRA tensors on their base layer's device (tensors loaded elsewhere, as PEFT does)."""
        for _, m in lora.lora_layers(self.model):
            if name in m.r:
                device = m.base_layer.weight.device
                for p in m.adapter_params(name):
                    if p.device != device and not p.is_meta:
                        p.data = p.data.to(device)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter `name` (LoRA factors and its trained copies of whole modules)."""
        out = [t for _, m in lora.lora_layers(self.model) if name in m.r for t in m.adapter_params(name)]
        return out + [p for head in lora.modules_to_save_copies(self.model, name) for p in head.parameters()]

    def _mark_trainable(self, freeze_base: bool = False) -> None:
        """Base frozen; only the active adapters train, unless they were loaded for inference. An active adapter
        with bias="all" also trains every bias of the model, with "lora_only" the biases of the LoRA-wrapped layers
        (PEFT's rules; like PEFT, switching adapters does not freeze them again)."""
        if freeze_base:
            for p in self.model.parameters():
                p.requires_grad_(False)
        # One walk over the modules for all adapters: adapter_parameters() per adapter walks them once each, and
        # with every adapter adding modules, loading the n-th adapter would cost O(n²) (seconds at n = 64).
        layers = [m for _, m in lora.lora_layers(self.model)]
        heads = [m for _, m in self.model.named_modules() if isinstance(m, lora.ModulesToSave)]
        for name, config in self.peft_config.items():
            train = name in self._state.active and not config.inference_mode
            params = [t for m in layers if name in m.r for t in m.adapter_params(name)]
            params += [p for h in heads if name in h.modules_to_save for p in h.modules_to_save[name].parameters()]
            for p in params:
                if p.requires_grad != train:
                    p.requires_grad_(train)
            if train:
                for p in trained_biases(self.model, config.bias):
                    p.requires_grad_(True)
        for _, m in lora.lora_layers(self.model):  # factors a method keeps fixed (MiCA's B) never train
            for name in m.frozen_peft_weight_names:
                for p in m.frozen_params(name):
                    p.requires_grad_(False)

    # --- merging ----------------------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights: W += s·B A. Forward then costs exactly the base model."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        layers = lora.lora_layers(self.model)
        names = list(adapter_names or self.active_adapters)
        for name in names:
            self._check_known(name)
        merged = list(dict.fromkeys(n for _, m in layers for n in m.merged_adapters))
        todo = [n for n in names if n not in merged]
        if merged and todo:  # PEFT's words (it says them once per layer; once is enough)
            warnings.warn(
                f"Already following adapters were merged {','.join(merged)}. "
                f"You are now additionally merging {','.join(todo)}.",
                stacklevel=3,
            )
        elif merged:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=3)
        for name in todo:
            for _, m in layers:
                m.merge(name, safe=safe_merge)

    def unmerge_adapter(self) -> None:
        for _, m in lora.lora_layers(self.model):
            m.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge and return the plain transformers model, with no adapter modules left in it."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        lora.remove_wrappers(self.model, merged=True)
        untie_config_if_diverged(self.model)
        self.model.__dict__.pop("peft_config", None)
        return self.model

    def unload(self) -> nn.Module:
        """Remove all adapters without merging and return the original transformers model."""
        lora.remove_wrappers(self.model, merged=False)
        self.model.__dict__.pop("peft_config", None)
        return self.model

    # --- combining --------------------------------------------------------------------------------------------

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """A new adapter ΔW ≈ Σ wᵢ ΔWᵢ. linear: mixes A and B (same r, approximate); cat: stacks them (exact,
        r = Σ rᵢ); svd: truncated SVD of the exact sum (r = svd_rank or max rᵢ)."""
        for a in adapters:
            self._check_known(a)
        if len(adapters) != len(weights):
            raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
        if combination_type not in ("linear", "cat", "svd"):
            raise ValueError(
                f"combination_type={combination_type!r} is not supported by smolpeft; use 'linear', 'cat' or 'svd' "
                "(ties, dare_* and magnitude_prune are PEFT-only)"
            )
        if len(adapters) == 1:
            combination_type = "linear"  # as PEFT: one adapter is only rescaled
        if density is not None:
            raise ValueError(f"density={density!r} applies to ties/dare/magnitude_prune, which smolpeft does not do")
        configs = [self.peft_config[a] for a in adapters]
        dora = [a for a, c in zip(adapters, configs) if c.use_dora]
        if dora:  # a magnitude is tied to its own direction; a combination has no meaningful one
            raise ValueError(f"add_weighted_adapter cannot combine DoRA adapters {dora}; merge them one by one instead")
        shared = [
            p
            for p, m in self.model.named_modules()
            if isinstance(m, ModulesToSave) and sum(a in m.modules_to_save for a in adapters) > 1
        ]
        if shared:
            raise ValueError(
                "Cannot add weighted adapters if they target the same module with modules_to_save, but found "
                f"{len(shared)} such instance(s). (trained copies of a whole module cannot be combined: {shared})"
            )
        ranks = [c.r for c in configs]
        if any(c.rank_pattern or c.alpha_pattern for c in configs) and combination_type == "linear":
            raise ValueError("combination_type='linear' needs equal ranks everywhere; adapters have rank_pattern")
        if combination_type == "linear":
            if len(set(ranks)) > 1:
                raise ValueError(
                    f"combination_type='linear' needs adapters of equal r, found {ranks}; use 'cat' or 'svd'"
                )
            new_r = ranks[0]
        elif combination_type == "cat":
            new_r = sum(max([c.r, *c.rank_pattern.values()]) for c in configs)
        else:
            new_r = svd_rank or max(max([c.r, *c.rank_pattern.values()]) for c in configs)
        targets = [c.target_modules for c in configs]
        if all(isinstance(t, str) for t in targets):
            new_targets = "|".join(f"({t})" for t in targets)
        elif any(isinstance(t, str) for t in targets):
            raise ValueError("cannot combine adapters whose target_modules mix a regex and a list")
        else:
            new_targets = sorted(set().union(*targets))
        cfg = dataclasses.replace(
            configs[0],
            r=new_r,
            lora_alpha=new_r,
            target_modules=new_targets,
            rank_pattern={},
            alpha_pattern={},
            init_lora_weights=True,
            inference_mode=False,
            use_rslora=False,
        )
        self.add_adapter(adapter_name, cfg)
        with torch.no_grad():
            for _, m in lora.lora_layers(self.model):
                if adapter_name in m.r:
                    A, B = _combine(
                        m, adapters, weights, combination_type, new_r, svd_clamp, svd_full_matrices, svd_driver
                    )
                    newA, newB = m.factors(adapter_name)
                    newA.data, newB.data = A.to(newA.dtype).contiguous(), B.to(newB.dtype).contiguous()
            for _, m in self.model.named_modules():  # a head trained by one of the adapters comes along
                if isinstance(m, ModulesToSave) and adapter_name in m.modules_to_save:
                    src = next((a for a in adapters if a in m.modules_to_save), None)
                    if src is not None:
                        m.modules_to_save[adapter_name].load_state_dict(m.modules_to_save[src].state_dict())


def untie_config_if_diverged(model: nn.Module) -> None:
    """After a merge, a config that says tie_word_embeddings=True while the input and output embeddings hold different
    tensors (merged into one of them, or never tied) would re-tie them on save/load: set it False, as PEFT does."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    try:
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return
    out_w, in_w = getattr(out_emb, "weight", None), getattr(in_emb, "weight", None)
    if out_w is not None and in_w is not None and out_w.data_ptr() != in_w.data_ptr():
        config.tie_word_embeddings = False
        warnings.warn(
            "Input and output embeddings are no longer tied after merging. "
            "Setting `tie_word_embeddings=False` in the model config.",
            stacklevel=3,
        )


def trained_biases(model: nn.Module, bias: str) -> list[nn.Parameter]:
    """The base biases an adapter with this `bias` setting trains: "all" every `*.bias` of the model (but the frozen
    originals of modules_to_save, as in PEFT), "lora_only" those of the LoRA-wrapped layers, "none" none."""
    if bias == "all":
        return [
            p
            for n, p in model.named_parameters()
            if (n == "bias" or n.endswith(".bias")) and ".original_module." not in f".{n}"
        ]
    if bias == "lora_only":
        return [m.bias for _, m in lora.lora_layers(model) if m.bias is not None]
    return []


def inject_adapter_in_model(
    peft_config: LoraConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Inject LoRA layers into `model` in place and return it, with no PeftModel around it (PEFT's low-level API)."""
    if not isinstance(peft_config, LoraConfig):
        raise ValueError(f"inject_adapter_in_model supports LoRA configs, not {peft_config.peft_type.value}")
    if state_dict is not None:
        raise ValueError("inject_adapter_in_model(state_dict=...) is not supported by smolpeft; pass target_modules")
    return LoraModel(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage).model


def _combine(
    m: LoraLayer, adapters, weights, kind, new_r, clamp, full_matrices, driver
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (new_r×in) and B (out×new_r) of one layer for add_weighted_adapter; PEFT's formulas, for equal numbers."""
    present = [(a, w) for a, w in zip(adapters, weights) if a in m.r]
    A0, B0 = m.factors(present[0][0])
    if kind == "linear":  # sqrt(w·s) on each factor, the sign on A
        ws = [(w * m.scaling[a], a) for a, w in present]
        A = sum((abs(x) ** 0.5 * (1 if x >= 0 else -1)) * m.factors(a)[0] for x, a in ws)
        B = sum(abs(x) ** 0.5 * m.factors(a)[1] for x, a in ws)
        return A, B
    if kind == "cat":
        A = torch.cat([w * m.scaling[a] * m.factors(a)[0] for a, w in present])
        B = torch.cat([m.factors(a)[1] for a, _ in present], dim=1)
        pad = new_r - A.shape[0]  # layers missing some adapters leave the tail of the rank at zero
        return torch.cat([A, A0.new_zeros(pad, A.shape[1])]), torch.cat([B, B0.new_zeros(B.shape[0], pad)], dim=1)
    delta = sum(w * (m.factors(a)[1] @ m.factors(a)[0]) * m.scaling[a] for a, w in present)  # out×in
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=full_matrices, driver=driver)
    B, A = U[:, :new_r] @ torch.diag(S[:new_r]), Vh[:new_r]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A, B
