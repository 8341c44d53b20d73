"""PeftModel: a transformers model plus named adapters, with Hugging Face PEFT's API and object graph.

LoRA: `PeftModel.base_model` is the `LoraModel` tuner and `.base_model.model` the transformers model, as in PEFT.
Prompt tuning: `base_model` is the transformers model itself and the virtual tokens live in `prompt_encoder`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys
from transformers import PreTrainedModel

from . import checkpoint, lora, storage
from .config import LoraConfig, PeftConfig, PromptTuningConfig, TaskType, load_config
from .lora import BASE, AdapterState
from .loss import causal_lm_forward, lean_applies
from .prompt import PromptEmbedding, prepend
from .surface import refuse
from .tuner import CLS_HEADS, LoraModel, check_known, check_new

# Keyword arguments of from_pretrained/load_adapter that only choose where the files come from.
_HUB_KWARGS = {"subfolder", "revision", "token", "cache_dir", "local_files_only", "force_download", "use_auth_token"}


class NoWeightsError(ValueError, AttributeError):
    """A LoRA-only operation on a prompt-tuning model (PEFT raises AttributeError there: both catch it)."""


def _check_kwargs(where: str, kwargs: dict[str, Any], allowed: set[str]) -> None:
    bad = sorted(set(kwargs) - allowed)
    if bad:
        raise TypeError(f"{where}() got keyword arguments smolpeft does not support: {', '.join(bad)}")


class PeftModel(nn.Module):
    """Wraps a transformers (or any torch) model; adapters are injected in place and selected by name."""

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ):
        super().__init__()
        refuse(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        self._setup(model, isinstance(peft_config, LoraConfig), adapter_name, autocast_adapter_dtype)
        self.add_adapter(
            adapter_name,
            peft_config,
            low_cpu_mem_usage=low_cpu_mem_usage,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )

    def _setup(self, model: nn.Module, is_lora: bool, adapter_name: str, autocast_adapter_dtype: bool) -> None:
        """The empty wrapper: a LoraModel tuner for LoRA; for prompt tuning the model itself plus prompt encoders."""
        self.special_peft_forward_args = {"adapter_names"}
        if is_lora:
            self.base_model = LoraModel(model, {}, adapter_name, autocast_adapter_dtype)
            self.peft_config: dict[str, PeftConfig] = self.base_model.peft_config  # one registry, shared
            self._state = self.base_model._state
        else:
            self.base_model = model
            self.peft_config = {}
            self._state = AdapterState(active=[adapter_name])
            self.prompt_encoder = nn.ModuleDict()
            self.word_embeddings = model.get_input_embeddings()

    # --- adapters ---------------------------------------------------------------------------------------------

    def _is_prompt(self) -> bool:
        return not isinstance(self.base_model, LoraModel)

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add an adapter (not made active, except the first one); a failure leaves the model as it was.
        low_cpu_mem_usage: LoRA tensors are left on the meta device, for weights loaded afterwards (as in PEFT;
        prompt tuning builds its small embedding anyway, as PEFT does)."""
        refuse(peft_config)
        kind = PromptTuningConfig if self._is_prompt() else LoraConfig
        if not isinstance(peft_config, kind):
            have = "PROMPT_TUNING" if self._is_prompt() else "LORA"
            raise ValueError(f"cannot mix {peft_config.peft_type.value} with {have} adapters in one model")
        if self._is_prompt() and peft_config.task_type in _LORA_ONLY_TASKS:
            raise ValueError(
                f"PromptTuningConfig.task_type={peft_config.task_type!r} is not supported by smolpeft: prompt tuning "
                "does CAUSAL_LM, SEQ_CLS and FEATURE_EXTRACTION (LoRA does every task)"
            )
        if not self._is_prompt():
            self.base_model.add_adapter(
                adapter_name,
                peft_config,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
            return
        check_new(self.peft_config, adapter_name)
        emb = self.word_embeddings
        if peft_config.token_dim is not None and peft_config.token_dim != emb.embedding_dim:
            raise ValueError(
                f"prompt adapter {adapter_name!r} has token_dim={peft_config.token_dim}, "
                f"the model's embeddings have {emb.embedding_dim}"
            )
        mc = getattr(self.base_model, "config", None)
        peft_config.token_dim = emb.embedding_dim
        peft_config.num_transformer_submodules = 1
        peft_config.num_attention_heads = getattr(mc, "num_attention_heads", None)
        peft_config.num_layers = getattr(mc, "num_hidden_layers", None)
        self.prompt_encoder[adapter_name] = PromptEmbedding(peft_config, emb)
        self.peft_config[adapter_name] = peft_config
        if peft_config.task_type == TaskType.SEQ_CLS.value:
            lora.add_modules_to_save(self.base_model, CLS_HEADS, adapter_name, self._state)
        if not any(a in self.peft_config for a in self._state.active):
            self._state.active = [adapter_name]
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        self._mark_prompts()

    def _mark_prompts(self) -> None:
        for name, enc in self.prompt_encoder.items():
            train = name in self._state.active and not self.peft_config[name].inference_mode
            enc.requires_grad_(train)
            for head in lora.modules_to_save_copies(self.base_model, name):
                head.requires_grad_(train)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        if not self._is_prompt():
            self.base_model.delete_adapter(adapter_name)
            return
        del self.prompt_encoder[adapter_name], self.peft_config[adapter_name]
        lora.delete_modules_to_save(self.base_model, adapter_name)
        self._state.active = [a for a in self._state.active if a != adapter_name] or list(self.peft_config)[:1]
        self._mark_prompts()

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make `adapter_name` the active adapter; it trains unless loaded for inference or inference_mode=True."""
        self._check_known(adapter_name)
        if self._is_prompt():
            self._state.active = [adapter_name]
            self._mark_prompts()
            if inference_mode:
                for p in self._adapter_tensors(adapter_name):
                    p.requires_grad_(False)
        else:
            self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def _check_known(self, name: str) -> None:
        check_known(self.peft_config, name)

    @property
    def active_adapter(self) -> str | list[str]:
        a = self._state.active
        return a[0] if len(a) == 1 else list(a)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._state.active)

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self._state.active[0]]

    @property
    def peft_type(self):
        return self.active_peft_config.peft_type

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes exactly the base model (merged weights are unmerged first); on exit
        the adapters are as they were: enabled, or still disabled. Layers switched on and off one by one cannot be
        restored, so they all come back on (PEFT's rule, with its warning)."""
        layers = lora.lora_layers(self.get_base_model())
        if any(m.merged_adapters for _, m in layers):
            warnings.warn("disable_adapter() unmerges the merged adapters", stacklevel=3)
            self.unmerge_adapter()
        states = {m.disable_adapters for _, m in layers} or {self._state.disabled}
        if len(states) > 1:
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are disabled. This is most "
                "likely unintentional. After exiting the disable_adapter context, all adapters will be enabled",
                stacklevel=3,
            )
        was_enabled = states != {True}
        if self._is_prompt():
            self._state.disabled = True
        else:
            self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            if self._is_prompt():
                self._state.disabled = not was_enabled
            elif was_enabled:
                self.base_model.enable_adapter_layers()

    @contextlib.contextmanager
    def _rows(self, adapter_names: list[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)} "
                f"(known: {', '.join(self.peft_config)}, {BASE})"
            )
        if self.training:  # as PEFT: one adapter per row is for inference
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if any(m.merged_adapters for _, m in lora.lora_layers(self.get_base_model())):
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        self._state.row_adapters = list(adapter_names)
        try:
            yield
        finally:
            self._state.row_adapters = None

    # --- forward and generate ---------------------------------------------------------------------------------

    def _prompt_on(self) -> bool:
        return self._is_prompt() and not self._state.disabled

    def get_prompt(self, batch_size: int, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The active adapter's virtual tokens, batch_size × n × d."""
        return self.prompt_encoder[self._state.active[0]].embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        return self.prompt_encoder[adapter_name].embedding.weight.detach().cpu()

    def _prompts(self, batch_names: list[str] | None) -> torch.Tensor:
        if batch_names is None:
            return self.prompt_encoder[self._state.active[0]].embedding.weight
        if BASE in batch_names or len({self.prompt_encoder[n].embedding.weight.shape for n in batch_names}) > 1:
            raise ValueError("a mixed prompt-tuning batch needs adapters with equal num_virtual_tokens and no __base__")
        return torch.stack([self.prompt_encoder[n].embedding.weight for n in batch_names])

    def _prompt_inputs(self, input_ids, inputs_embeds, attention_mask, labels, kwargs, names):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if kwargs.pop("position_ids", None) is not None:
            warnings.warn("position_ids are ignored with prompt tuning", stacklevel=3)
        causal = self.active_peft_config.task_type != TaskType.SEQ_CLS.value
        embeds, mask, labels, types = prepend(
            self._prompts(names), inputs_embeds, attention_mask, labels, kwargs.pop("token_type_ids", None), causal
        )
        if types is not None:
            kwargs["token_type_ids"] = types
        return embeds, mask, labels

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The wrapped model's forward, with the active adapters (or one adapter per row: `adapter_names`)."""
        with self._rows(adapter_names):
            if self._prompt_on():
                if args:  # the first positional argument of a transformers model is input_ids
                    kwargs["input_ids"], args = args[0], ()
                embeds, mask, labels = self._prompt_inputs(
                    kwargs.pop("input_ids", None),
                    kwargs.pop("inputs_embeds", None),
                    kwargs.pop("attention_mask", None),
                    kwargs.pop("labels", None),
                    kwargs,
                    adapter_names,
                )
                kwargs |= {
                    k: v
                    for k, v in (("inputs_embeds", embeds), ("attention_mask", mask), ("labels", labels))
                    if v is not None
                }
            if not args and kwargs.get("labels") is not None and lean_applies(self.get_base_model(), kwargs):
                return causal_lm_forward(self.get_base_model(), **kwargs)  # chunked loss, logits computed on access
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        with self._rows(adapter_names):
            if not self._prompt_on():
                return self.get_base_model().generate(*args, **kwargs)
            input_ids = kwargs.pop("input_ids", args[0] if args else None)
            embeds, mask, _ = self._prompt_inputs(
                input_ids, None, kwargs.pop("attention_mask", None), None, kwargs, adapter_names
            )
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

    # --- merging (LoRA) ---------------------------------------------------------------------------------------

    def _lora(self, what: str) -> LoraModel:
        if self._is_prompt():
            raise NoWeightsError(f"{what} applies to LoRA adapters; prompt tuning has no weights to merge")
        return self.base_model

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights: W += s·B A. Forward then costs exactly the base model."""
        self._lora("merge_adapter").merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self._lora("unmerge_adapter").unmerge_adapter()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge and return the plain transformers model, with no adapter modules left in it."""
        return self._lora("merge_and_unload").merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove all adapters without merging and return the original transformers model."""
        return self._lora("unload").unload()

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs) -> None:
        self._lora("add_weighted_adapter").add_weighted_adapter(adapters, weights, adapter_name, **kwargs)

    # --- saving and loading -----------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        """PEFT layout: adapter "default" at the root, any other adapter in a subfolder named after it, plus a
        README.md model card (written only where none exists)."""
        _check_kwargs("save_pretrained", kwargs, set())
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory} is a file, not a directory")
        if save_embedding_layers not in (True, False, "auto"):
            raise ValueError(f"save_embedding_layers={save_embedding_layers!r}; expected True, False or 'auto'")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._check_known(name)
        if not is_main_process:
            return
        for name in names:
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(out, exist_ok=True)
            config = dataclasses.replace(self.peft_config[name], inference_mode=True)
            params = checkpoint.get_peft_model_state_dict(
                self, adapter_name=name, save_embedding_layers=save_embedding_layers
            )
            if path_initial_model_for_weight_conversion is not None:
                config, params = checkpoint.principal_to_lora(config, params, path_initial_model_for_weight_conversion)
            checkpoint.save_weights(params, out, safe_serialization)
            config.save_pretrained(out)
            checkpoint.write_model_card(out, config, **self._card_facts())

    def _card_facts(self) -> dict[str, Any]:
        """What PEFT's model card says about the base model: its config's `_name_or_path`, and tags."""
        base = self.get_base_model()
        tags = set(getattr(base, "model_tags", None) or [])
        if isinstance(getattr(self.base_model, "model", None), PreTrainedModel):  # PEFT's test, as it is
            tags.add("transformers")
        if isinstance(self.active_peft_config, LoraConfig):
            tags.add("lora")
        if hasattr(base, "name_or_path"):
            tags.add(f"base_model:adapter:{base.name_or_path}")
        mc = getattr(base, "config", None)
        name = mc.to_dict().get("_name_or_path") if hasattr(mc, "to_dict") else None
        pipeline = "text-generation" if isinstance(self, PeftModelForCausalLM) else None
        return dict(base_model=name, tags=sorted(tags), pipeline_tag=pipeline)

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload adapter",
        **save_kwargs: Any,
    ) -> Any:
        """Upload the adapter files only (never the base model's weights) to a Hub repository."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, **save_kwargs)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Load a PEFT-format adapter; any problem with the files raises and leaves the model as it was.

        The file's shapes are checked against its config and this model from the safetensors header before any
        adapter memory is allocated. PiSSA/OLoRA adapters become plain LoRA deltas (rank 2r), so loading one
        never rewrites the base weights that other adapters and the base itself compute with."""
        ignore_sizes, dtype = _load_options("load_adapter", kwargs, ephemeral_gpu_offload, key_mapping)
        path = checkpoint.resolve_dir(model_id, **kwargs)
        config = load_config(path)
        self._load(
            path,
            config,
            adapter_name,
            is_trainable,
            torch_device,
            ignore_sizes,
            dtype,
            autocast_adapter_dtype,
            low_cpu_mem_usage,
        )
        # As PEFT, a load result; a file load is strict here, so nothing is ever missing or unexpected.
        return _IncompatibleKeys([], [])

    def _load(
        self, path, config, adapter_name, is_trainable, device, ignore_sizes, dtype, autocast=True, low_cpu=False
    ) -> None:
        check_new(self.peft_config, adapter_name)  # before the file is read
        checkpoint.check_header(path, self.get_base_model(), config, ignore_sizes)
        weights = checkpoint.read_weights(path, device=device)
        config.inference_mode = not is_trainable
        original = config
        if checkpoint.is_principal(config):
            config = checkpoint.principal_config(config)
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu, autocast_adapter_dtype=autocast)
        try:
            if config is not original:
                weights = checkpoint.principal_weights(self.get_base_model(), original, weights)
            source = os.path.join(path, checkpoint.WEIGHTS_NAME)
            checkpoint.load_adapter_weights(self, weights, adapter_name, source, ignore_sizes)
            if low_cpu and not self._is_prompt():  # the loaded tensors took the meta ones' place, on `device`
                self.base_model._move_adapter_to_base_device(adapter_name)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        if dtype is not None:
            for p in self._adapter_tensors(adapter_name):
                p.data = p.data.to(dtype)
        if not is_trainable:
            self.eval()  # as PEFT: loaded for inference, so dropout is off

    def _adapter_tensors(self, name: str) -> list[torch.Tensor]:
        if self._is_prompt():
            heads = lora.modules_to_save_copies(self.base_model, name)
            return [*self.prompt_encoder[name].parameters(), *(p for h in heads for p in h.parameters())]
        return self.base_model.adapter_parameters(name)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Wrap `model` and load an adapter into it; the class follows the adapter's task_type, as in PEFT."""
        device = kwargs.pop("torch_device", None)
        ignore_sizes, dtype = _load_options("from_pretrained", kwargs, ephemeral_gpu_offload, key_mapping)
        path = checkpoint.resolve_dir(model_id, **kwargs)
        config = config or load_config(path)
        if cls is PeftModel:
            cls = _TASK_CLASSES.get(config.task_type, PeftModel)
        # The wrapper starts empty (no throwaway adapter is built): _load injects the real one.
        peft_model = cls.__new__(cls)
        nn.Module.__init__(peft_model)
        peft_model._setup(model, isinstance(config, LoraConfig), adapter_name, autocast_adapter_dtype)
        try:
            peft_model._load(
                path,
                config,
                adapter_name,
                is_trainable,
                device,
                ignore_sizes,
                dtype,
                autocast_adapter_dtype,
                low_cpu_mem_usage,
            )
        except BaseException:
            if not peft_model._is_prompt():
                peft_model.base_model.unload()
            raise
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

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients on or off for these adapters' tensors (LoRA only, as in PEFT)."""
        if self._is_prompt():
            raise TypeError("Setting `requires_grad` is not supported for prompt learning methods like PROMPT_TUNING.")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._check_known(name)
            # as PEFT, factors the method keeps fixed (MiCA's B) stay frozen
            frozen = {id(p) for _, m in lora.lora_layers(self.base_model.model) for p in m.frozen_params(name)}
            for p in self.base_model.adapter_parameters(name):
                p.requires_grad_(requires_grad and id(p) not in frozen)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether the adapter is an additive W + ΔW update that can be written as LoRA: it already is, for LoRA."""
        return not self._is_prompt()

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Let gradients reach checkpointed blocks through frozen embeddings (not needed for quantized models,
        which prepare_model_for_kbit_training handles)."""
        if not any(getattr(model, a, False) for a in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            elif hasattr(model, "get_input_embeddings"):
                model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        return model

    def get_base_model(self) -> nn.Module:
        return self.base_model if self._is_prompt() else self.base_model.model

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        # Reentrant checkpointing only back-propagates into blocks whose input requires grad; the embeddings are frozen.
        self.get_base_model().enable_input_require_grads()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_state", "peft_config", "prompt_encoder", "word_embeddings"):
                raise
            return getattr(self.base_model, name)


def _load_options(
    where: str, kwargs: dict[str, Any], ephemeral_gpu_offload: bool, key_mapping: Any
) -> tuple[bool, Any]:
    """Check from_pretrained/load_adapter keywords, refusing what smolpeft does not do, and take out
    (ignore_mismatched_sizes, torch_dtype); what stays in `kwargs` only says where the files come from."""
    _check_kwargs(where, kwargs, _HUB_KWARGS | {"ignore_mismatched_sizes", "torch_dtype", "device_map"})
    if ephemeral_gpu_offload or key_mapping:
        raise ValueError("ephemeral_gpu_offload and key_mapping are not supported by smolpeft")
    device_map = kwargs.pop("device_map", None)
    if isinstance(device_map, dict) and len(set(device_map.values())) > 1:  # one device for the adapter is fine
        raise ValueError("device_map spreading an adapter over several devices is not supported by smolpeft")
    return kwargs.pop("ignore_mismatched_sizes", False), kwargs.pop("torch_dtype", None)


def _named_forward(
    self,
    input_ids=None,
    attention_mask=None,
    inputs_embeds=None,
    labels=None,
    output_attentions=None,
    output_hidden_states=None,
    return_dict=None,
    task_ids=None,
    adapter_names=None,
    **kwargs,
):
    """PeftModel.forward with transformers' argument names spelled out, so Trainer keeps those dataset columns."""
    if task_ids is not None:
        raise ValueError("task_ids are for multitask prompt tuning, which smolpeft does not do")
    args = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        inputs_embeds=inputs_embeds,
        labels=labels,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        return_dict=return_dict,
    )
    return PeftModel.forward(
        self, adapter_names=adapter_names, **{k: v for k, v in args.items() if v is not None}, **kwargs
    )


class PeftModelForCausalLM(PeftModel):
    """A causal LM with adapters."""

    forward = _named_forward


class PeftModelForSequenceClassification(PeftModel):
    """A classifier with adapters; its head (`classifier` / `score`) is trained and saved with each adapter."""

    forward = _named_forward


class PeftModelForFeatureExtraction(PeftModel):
    """An encoder with adapters."""

    forward = _named_forward


class PeftModelForTokenClassification(PeftModel):
    """A token classifier with adapters; its head (`classifier` / `score`) is trained and saved with each adapter."""

    forward = _named_forward


class PeftModelForQuestionAnswering(PeftModel):
    """An extractive question-answering model with adapters; its `qa_outputs` head is trained and saved with each
    adapter. start_positions / end_positions go to the model as they are."""

    forward = _named_forward


class PeftModelForSeq2SeqLM(PeftModel):
    """An encoder-decoder LM with LoRA adapters (decoder_input_ids and the like go to the model as they are).
    Prompt tuning on encoder-decoder models is not supported by smolpeft and is refused."""

    forward = _named_forward


_LORA_ONLY_TASKS = {TaskType.TOKEN_CLS.value, TaskType.QUESTION_ANS.value, TaskType.SEQ_2_SEQ_LM.value}

_TASK_CLASSES = {
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
}


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Inject a fresh adapter into `model` (in place) and return the wrapping PeftModel (of the config's task)."""
    if mixed:
        raise ValueError("mixed=True (PeftMixedModel) is not supported by smolpeft")
    refuse(peft_config)
    peft_config = copy.copy(peft_config)
    # As PEFT: the config names the model actually wrapped (None for a model with no name_or_path, not "");
    # a name the user set that differs is overwritten, with a warning.
    old_name, new_name = peft_config.base_model_name_or_path, model.__dict__.get("name_or_path") or None
    peft_config.base_model_name_or_path = new_name
    if lora.lora_layers(model):
        warnings.warn(
            "You are trying to modify a model with PEFT for a second time. If you want to reload the model with a "
            "different config, make sure to call `.unload()` before.",
            stacklevel=2,
        )
    if old_name is not None and old_name != new_name:
        warnings.warn(
            f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}'. "
            "Please ensure that the correct base model is loaded when loading this checkpoint.",
            stacklevel=2,
        )
    if revision is not None:
        peft_config.revision = revision
    cls = _TASK_CLASSES.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)


class _AutoPeftModel:
    _auto_name = "AutoModel"

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, adapter_name: str = "default", is_trainable: bool = False, **kwargs
    ):
        """Load the base named by `base_model_name_or_path` (kwargs go to its from_pretrained), then the adapter."""
        import transformers

        path = checkpoint.resolve_dir(pretrained_model_name_or_path, kwargs.pop("subfolder", None))
        config = load_config(path)
        if not config.base_model_name_or_path:
            raise ValueError(f"{path}/adapter_config.json has no base_model_name_or_path; load the base yourself")
        if cls._auto_name == "AutoModelForSequenceClassification" and "num_labels" not in kwargs:
            names = storage.read_labels(path)  # label names saved beside the adapter by smolpeft
            heads = checkpoint.head_shapes(path)
            if names:
                kwargs |= dict(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
            elif heads:
                kwargs["num_labels"] = heads[-1][0]  # the trained head's last layer says how many labels there are
        base = getattr(transformers, cls._auto_name).from_pretrained(config.base_model_name_or_path, **kwargs)
        return PeftModel.from_pretrained(
            base, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config
        )


class AutoPeftModel(_AutoPeftModel):
    _auto_name = "AutoModel"


class AutoPeftModelForCausalLM(_AutoPeftModel):
    _auto_name = "AutoModelForCausalLM"


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    _auto_name = "AutoModelForSequenceClassification"
