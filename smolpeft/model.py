"""PeftModel: a transformers model plus named adapters, with Hugging Face PEFT's API."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from . import checkpoint, lora
from .config import WEIGHTS_NAME, LoraConfig, PeftConfig, PromptTuningConfig, TaskType, load_config
from .lora import BASE, AdapterState, LoraLayer, ModulesToSave, _discard
from .prompt import init_prompt, prepend

_CLS_HEADS = ["classifier", "score"]  # PEFT trains the classification head with every SEQ_CLS adapter


def _resolve_dir(model_id: str | os.PathLike, subfolder: str | None = None) -> str:
    """A local adapter directory, or a Hub repo id downloaded (config and weights only) to the local cache."""
    path = os.path.join(model_id, subfolder) if subfolder else str(model_id)
    if os.path.isdir(path) or os.path.exists(model_id) or str(model_id).count("/") != 1:
        return path
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(str(model_id), allow_patterns=["*adapter_config.json", "*adapter_model.safetensors"])
    except Exception as e:
        raise FileNotFoundError(f"adapter directory not found: {model_id} (not local, and the Hub said: {e})") from e
    return os.path.join(root, subfolder) if subfolder else root


class PeftModel(nn.Module):
    """Wraps a transformers model; adapters are injected in place and selected by name."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default"):
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.prompt_embeddings = nn.ParameterDict()
        self._state = AdapterState(active=adapter_name)
        self._params: dict[str, list[torch.Tensor]] = {}  # each adapter's tensors, so switching never walks the model
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        self.add_adapter(adapter_name, peft_config)

    # --- adapters ---------------------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Add an adapter (not made active, except the first one); a failure leaves the model as it was."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it first or pick another name")
        if adapter_name == BASE:
            raise ValueError(f"{BASE!r} is reserved for 'no adapter' in mixed batches")
        types = {c.peft_type for c in self.peft_config.values()}
        if types and peft_config.peft_type not in types:
            raise ValueError(f"cannot mix {peft_config.peft_type.value} with {types.pop().value} adapters in one model")
        self.peft_config[adapter_name] = peft_config
        try:
            heads = list(peft_config.modules_to_save or []) if isinstance(peft_config, LoraConfig) else []
            if peft_config.task_type == TaskType.SEQ_CLS.value:
                heads += [h for h in _CLS_HEADS if h not in heads]
            if heads:
                lora.add_modules_to_save(self.base_model, heads, adapter_name, self._state)
            if isinstance(peft_config, LoraConfig):
                # Loading a PiSSA/OLoRA adapter re-runs its init, as PEFT does: the file holds A and B trained on top
                # of the residual W - s·B₀A₀, which only the same decomposition of the same base can rebuild.
                lora.inject(self.base_model, peft_config, adapter_name, self._state)
            else:
                self._add_prompt(adapter_name, peft_config)
        except BaseException:
            self._drop(adapter_name)
            raise
        if self._state.active is None or self._state.active not in self.peft_config:
            self._state.active = adapter_name
        self._params[adapter_name] = list(self._adapter_params(adapter_name).values())
        self._mark_trainable(freeze_base=True)

    def _add_prompt(self, name: str, config: PromptTuningConfig) -> None:
        emb = self.base_model.get_input_embeddings()
        if config.token_dim is not None and config.token_dim != emb.embedding_dim:
            raise ValueError(
                f"prompt adapter {name!r} has token_dim={config.token_dim}, the model's embeddings have {emb.embedding_dim}"
            )
        mc = getattr(self.base_model, "config", None)
        config.token_dim = emb.embedding_dim
        config.num_transformer_submodules = 1
        config.num_attention_heads = getattr(mc, "num_attention_heads", None)
        config.num_layers = getattr(mc, "num_hidden_layers", None)
        self.prompt_embeddings[name] = nn.Parameter(init_prompt(config, emb))

    def _drop(self, name: str) -> None:
        self.peft_config.pop(name, None)
        self._params.pop(name, None)
        _discard(self.prompt_embeddings, name)
        for _, m in self.base_model.named_modules():
            if isinstance(m, LoraLayer):
                m.delete(name)
            elif isinstance(m, ModulesToSave):
                _discard(m.modules_to_save, name)
        lora.remove_wrappers(self.base_model, merged=False, only_empty=True)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        for _, m in lora.lora_layers(self.base_model):
            if adapter_name in m.merged_adapters:
                m.unmerge()
        self._drop(adapter_name)
        if self._state.active == adapter_name:
            self._state.active = next(iter(self.peft_config), None)
        self._mark_trainable()

    def set_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        self._state.active = adapter_name
        self._mark_trainable()

    def _check_known(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; known adapters: {', '.join(self.peft_config) or '(none)'}")

    def _adapter_params(self, name: str) -> dict[str, torch.Tensor]:
        return checkpoint.adapter_params(self.base_model, name, self.prompt_embeddings[name] if name in self.prompt_embeddings else None)

    def _mark_trainable(self, freeze_base: bool = False) -> None:
        """Base frozen; only the active adapter trains, unless it was loaded for inference."""
        if freeze_base:
            for p in self.base_model.parameters():
                p.requires_grad_(False)
        for name, config in self.peft_config.items():
            train = name == self._state.active and not config.inference_mode
            for p in self._params.get(name, ()):
                if p.requires_grad != train:
                    p.requires_grad_(train)

    @property
    def active_adapter(self) -> str | None:
        return self._state.active

    @property
    def active_adapters(self) -> list[str]:
        return [self._state.active] if self._state.active else []

    @property
    def peft_type(self):
        return self.peft_config[self._state.active].peft_type

    def _is_prompt(self) -> bool:
        return bool(self.prompt_embeddings)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes exactly the base model (merged weights are unmerged first)."""
        if any(m.merged_adapters for _, m in lora.lora_layers(self.base_model)):
            warnings.warn("disable_adapter() unmerges the merged adapters", stacklevel=3)
            self.unmerge_adapter()
        self._state.disabled = True
        try:
            yield
        finally:
            self._state.disabled = False

    @contextlib.contextmanager
    def _rows(self, adapter_names: list[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names has unknown adapters {unknown}; known: {', '.join(self.peft_config)}, {BASE}")
        if any(m.merged_adapters for _, m in lora.lora_layers(self.base_model)):
            raise ValueError("adapter_names cannot be used while adapters are merged; call unmerge_adapter() first")
        self._state.row_adapters = list(adapter_names)
        try:
            yield
        finally:
            self._state.row_adapters = None

    # --- forward and generate ---------------------------------------------------------------------------------

    def _prompts(self, batch_names: list[str] | None) -> torch.Tensor:
        if batch_names is None:
            return self.prompt_embeddings[self._state.active]
        if BASE in batch_names or len({self.prompt_embeddings[n].shape for n in batch_names}) > 1:
            raise ValueError("a mixed prompt-tuning batch needs adapters with equal num_virtual_tokens and no __base__")
        return torch.stack([self.prompt_embeddings[n] for n in batch_names])

    def _prompt_inputs(self, input_ids, inputs_embeds, attention_mask, labels, kwargs, names):
        if inputs_embeds is None:
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
        if kwargs.pop("position_ids", None) is not None:
            warnings.warn("position_ids are ignored with prompt tuning", stacklevel=3)
        causal = self.peft_config[self._state.active].task_type != TaskType.SEQ_CLS.value
        embeds, mask, labels, types = prepend(
            self._prompts(names), inputs_embeds, attention_mask, labels, kwargs.pop("token_type_ids", None), causal
        )
        if types is not None:
            kwargs["token_type_ids"] = types
        return embeds, mask, labels

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, adapter_names=None, **kwargs):
        with self._rows(adapter_names):
            if self._is_prompt() and not self._state.disabled and self._state.active is not None:
                inputs_embeds, attention_mask, labels = self._prompt_inputs(
                    input_ids, inputs_embeds, attention_mask, labels, kwargs, adapter_names
                )
                input_ids = None
            args = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels)
            from .loss import causal_lm_forward, lean_applies

            if labels is not None and lean_applies(self.get_base_model(), kwargs):  # chunked loss, lazy logits
                return causal_lm_forward(self.get_base_model(), **args, **kwargs)
            return self.base_model(**{k: v for k, v in args.items() if v is not None}, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        with self._rows(adapter_names):
            if not self._is_prompt() or self._state.disabled or self._state.active is None:
                return self.base_model.generate(*args, **kwargs)
            input_ids = kwargs.pop("input_ids", args[0] if args else None)
            embeds, mask, _ = self._prompt_inputs(input_ids, None, kwargs.pop("attention_mask", None), None, kwargs, adapter_names)
            if mask is None:
                mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            out = self.base_model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
            # transformers returns only new tokens when given embeddings; PEFT returns the prompt ids too.
            seqs = out if isinstance(out, torch.Tensor) else out.sequences
            ids = input_ids.repeat_interleave(seqs.shape[0] // input_ids.shape[0], dim=0)
            seqs = torch.cat([ids, seqs], dim=1)
            if isinstance(out, torch.Tensor):
                return seqs
            out.sequences = seqs
            return out

    # --- merging ----------------------------------------------------------------------------------------------

    def _lora_only(self, what: str) -> None:
        if self._is_prompt():
            raise ValueError(f"{what} applies to LoRA adapters; prompt tuning has no weights to merge")

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights: W += s·B A. Forward then costs exactly the base model."""
        self._lora_only("merge_adapter")
        for name in adapter_names or self.active_adapters:
            self._check_known(name)
            for _, m in lora.lora_layers(self.base_model):
                m.merge(name, safe=safe_merge)

    def unmerge_adapter(self) -> None:
        for _, m in lora.lora_layers(self.base_model):
            m.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge and return the plain transformers model, with no adapter modules left in it."""
        self._lora_only("merge_and_unload")
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        lora.remove_wrappers(self.base_model, merged=True)
        return self.base_model

    def unload(self) -> nn.Module:
        """Remove all adapters without merging and return the original transformers model."""
        lora.remove_wrappers(self.base_model, merged=False)
        return self.base_model

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
    ) -> None:
        """A new adapter ΔW ≈ Σ wᵢ ΔWᵢ. linear: mixes A and B (same r, approximate); cat: stacks them (exact,
        r = Σ rᵢ); svd: truncated SVD of the exact sum (r = svd_rank or max rᵢ)."""
        self._lora_only("add_weighted_adapter")
        for a in adapters:
            self._check_known(a)
        if len(adapters) != len(weights):
            raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
        configs = [self.peft_config[a] for a in adapters]
        ranks = [c.r for c in configs]
        if any(c.rank_pattern or c.alpha_pattern for c in configs):
            raise ValueError("add_weighted_adapter does not combine adapters with rank_pattern/alpha_pattern")
        if combination_type == "linear":
            if len(set(ranks)) > 1:
                raise ValueError(f"combination_type='linear' needs adapters of equal r, found {ranks}; use 'cat' or 'svd'")
            new_r = ranks[0]
        elif combination_type == "cat":
            new_r = sum(ranks)
        elif combination_type == "svd":
            new_r = svd_rank or max(ranks)
        else:
            raise ValueError(f"combination_type={combination_type!r}; expected 'linear', 'cat' or 'svd'")
        targets = [c.target_modules for c in configs]
        if all(isinstance(t, str) for t in targets):
            new_targets = "|".join(f"({t})" for t in targets)
        elif any(isinstance(t, str) for t in targets):
            raise ValueError("cannot combine adapters whose target_modules mix a regex and a list")
        else:
            new_targets = sorted(set().union(*targets))
        cfg = dataclasses.replace(
            configs[0], r=new_r, lora_alpha=new_r, target_modules=new_targets, rank_pattern={}, alpha_pattern={},
            init_lora_weights=True, inference_mode=False,
        )
        self.add_adapter(adapter_name, cfg)
        with torch.no_grad():
            for _, m in lora.lora_layers(self.base_model):
                if adapter_name in m.lora_A:
                    A, B = _combine(m, adapters, weights, combination_type, new_r, svd_clamp, svd_full_matrices)
                    m.lora_A[adapter_name].data = A.to(m.lora_A[adapter_name].dtype).contiguous()
                    m.lora_B[adapter_name].data = B.to(m.lora_B[adapter_name].dtype).contiguous()
            for _, m in self.base_model.named_modules():  # the new adapter's heads start from the first adapter's
                if isinstance(m, ModulesToSave) and adapter_name in m.modules_to_save and adapters[0] in m.modules_to_save:
                    m.modules_to_save[adapter_name].load_state_dict(m.modules_to_save[adapters[0]].state_dict())

    # --- saving and loading -----------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None, **_ignored) -> None:
        """PEFT layout: adapter "default" at the root, any other adapter in a subfolder named after it."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory} is a file, not a directory")
        for name in selected_adapters or list(self.peft_config):
            self._check_known(name)
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(out, exist_ok=True)
            params = self._adapter_params(name) | checkpoint.embedding_base_params(self.base_model, self.peft_config[name])
            checkpoint.save_weights(params, out)
            dataclasses.replace(self.peft_config[name], inference_mode=True).save_pretrained(out)

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, subfolder: str | None = None
    ) -> None:
        """Load a PEFT-format adapter; any problem with the files raises and leaves the model as it was."""
        path = _resolve_dir(model_id, subfolder)
        config = load_config(path)
        weights = checkpoint.read_weights(path)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config)
        try:
            self._copy_in(adapter_name, weights, path)
        except BaseException:
            self._restore_principal(adapter_name)
            self.delete_adapter(adapter_name)
            raise

    def _restore_principal(self, name: str) -> None:
        """Undo a PiSSA/OLoRA init (W_res + s·B₀A₀ = W) when its adapter failed to load; A, B are still B₀, A₀."""
        if getattr(self.peft_config.get(name), "init_lora_weights", True) in ("pissa", "olora"):
            self.merge_adapter([name])
            for _, m in lora.lora_layers(self.base_model):
                m.merged_adapters.clear()

    def _copy_in(self, name: str, weights: dict[str, torch.Tensor], path: str) -> None:
        params = self._adapter_params(name)
        embeds = checkpoint.embedding_base_params(self.base_model, self.peft_config[name])
        params |= {k: v for k, v in embeds.items() if k in weights}  # optional: PEFT reads them only if present
        checkpoint.copy_into(params, weights, os.path.join(path, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        subfolder: str | None = None,
    ) -> PeftModel:
        path = _resolve_dir(model_id, subfolder)
        config = config or load_config(path)
        weights = checkpoint.read_weights(path)
        config.inference_mode = not is_trainable
        peft_model = cls(model, config, adapter_name)
        try:
            peft_model._copy_in(adapter_name, weights, path)
        except BaseException:
            peft_model._restore_principal(adapter_name)
            peft_model.unload()
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    # --- counting and pass-through ----------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            if type(p).__name__ == "Params4bit":  # two 4-bit values per stored byte
                n *= 2 * p.element_size()
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, n = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {n:,d} || trainable%: {100 * t / n:.4f}")

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        # Reentrant checkpointing only back-propagates into blocks whose input requires grad; the embeddings are frozen.
        self.base_model.enable_input_require_grads()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_state", "_params", "peft_config", "prompt_embeddings"):
                raise
            return getattr(self.base_model, name)


def _combine(m: LoraLayer, adapters, weights, kind, new_r, clamp, full_matrices) -> tuple[torch.Tensor, torch.Tensor]:
    """A (new_r×in) and B (out×new_r) of one layer for add_weighted_adapter; PEFT's formulas, for equal numbers."""
    present = [(a, w) for a, w in zip(adapters, weights) if a in m.lora_A]
    A0, B0 = m.lora_A[present[0][0]], m.lora_B[present[0][0]]
    if kind == "linear":  # sqrt(w·s) on each factor, the sign on A
        ws = [(w * m.scaling[a], a) for a, w in present]
        A = sum((abs(x) ** 0.5 * (1 if x >= 0 else -1)) * m.lora_A[a] for x, a in ws)
        B = sum(abs(x) ** 0.5 * m.lora_B[a] for x, a in ws)
        return A, B
    if kind == "cat":
        A = torch.cat([w * m.scaling[a] * m.lora_A[a] for a, w in present])
        B = torch.cat([m.lora_B[a] for a, _ in present], dim=1)
        pad = new_r - A.shape[0]  # layers missing some adapters leave the tail of the rank at zero
        return torch.cat([A, A0.new_zeros(pad, A.shape[1])]), torch.cat([B, B0.new_zeros(B.shape[0], pad)], dim=1)
    delta = sum(w * (m.lora_B[a] @ m.lora_A[a]) * m.scaling[a] for a, w in present)  # out×in
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=full_matrices)
    B, A = U[:, :new_r] @ torch.diag(S[:new_r]), Vh[:new_r]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A, B


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Inject a fresh adapter into `model` (in place) and return the wrapping PeftModel."""
    return PeftModel(model, copy.copy(peft_config), adapter_name)


PeftModelForCausalLM = PeftModel
PeftModelForSequenceClassification = PeftModel
PeftModelForFeatureExtraction = PeftModel


class _AutoPeftModel:
    _auto_name = "AutoModel"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, adapter_name: str = "default", is_trainable: bool = False, **kwargs):
        """Load the base named by `base_model_name_or_path` (kwargs go to its from_pretrained), then the adapter."""
        import transformers

        path = _resolve_dir(pretrained_model_name_or_path, kwargs.pop("subfolder", None))
        config = load_config(path)
        if not config.base_model_name_or_path:
            raise ValueError(f"{path}/adapter_config.json has no base_model_name_or_path; load the base yourself")
        if cls._auto_name == "AutoModelForSequenceClassification" and "num_labels" not in kwargs:
            for k, v in checkpoint.read_weights(path).items():
                if k.endswith(("classifier.modules_to_save.weight", "score.modules_to_save.weight")):
                    kwargs["num_labels"] = v.shape[0]  # the trained head says how many labels there are
        base = getattr(transformers, cls._auto_name).from_pretrained(config.base_model_name_or_path, **kwargs)
        return PeftModel.from_pretrained(base, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config)


class AutoPeftModel(_AutoPeftModel):
    _auto_name = "AutoModel"


class AutoPeftModelForCausalLM(_AutoPeftModel):
    _auto_name = "AutoModelForCausalLM"


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    _auto_name = "AutoModelForSequenceClassification"
