"""Adapter configs: dataclasses with Hugging Face PEFT's field names, defaults, JSON form and loading API."""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .storage import atomic_write

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# Written as `peft_version`, as PEFT does with its own version; the local part says which library wrote the file
# and keeps the string a valid PEP 440 version for readers that parse it.
try:
    __version__ = importlib.metadata.version("smolpeft") + "+smolpeft"
except importlib.metadata.PackageNotFoundError:
    __version__ = "0.0.0+smolpeft"


class PeftType(str, enum.Enum):
    LORA = "LORA"
    PROMPT_TUNING = "PROMPT_TUNING"


class TaskType(str, enum.Enum):
    """PEFT's task vocabulary; the model classes say which of these they can build."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PromptTuningInit(str, enum.Enum):
    RANDOM = "RANDOM"
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"


class AdapterNotFoundError(FileNotFoundError, ValueError):
    """No adapter_config.json: a FileNotFoundError, and the ValueError that PEFT raises in the same place."""


# target_modules=None resolves through this table, keyed by `model.config.model_type` (PEFT's defaults for LoRA).
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        "llama llama4 mistral mixtral qwen2 qwen3 gemma gemma2 gemma3_text phi3 opt gptj gpt_neo stablelm".split(),
        ["q_proj", "v_proj"],
    ),
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "layoutlm"], ["query", "value"]),
    "deberta-v2": ["query_proj", "value_proj"],
    **dict.fromkeys(["gpt_neox", "falcon", "bloom"], ["query_key_value"]),
    "codegen": ["qkv_proj"],
    "mpt": ["Wqkv"],
}


def _get_commit_hash(package: str) -> str | None:
    """The git commit of a package installed from a VCS url (pip's direct_url.json), else None."""
    dist = importlib.metadata.distribution(package)
    for path in dist.files or []:
        if path.name == "direct_url.json":
            return json.loads(dist.locate_file(path).read_text()).get("vcs_info", {}).get("commit_id")
    return None


def _current_version() -> str:
    if ".dev" not in __version__:
        return __version__
    try:  # a dev version alone does not say what code wrote the file
        commit = _get_commit_hash("smolpeft") or "UNKNOWN"
    except Exception:
        msg = "A dev version of PEFT is used but there was an error while trying to determine the commit hash"
        warnings.warn(msg, stacklevel=4)
        commit = "UNKNOWN"
    return f"{__version__}@{commit}"


@dataclass
class PeftConfig:
    """Fields every adapter config has; `PeftConfig.from_pretrained(dir)` returns the subclass named by peft_type."""

    task_type: str | None = None
    peft_type: str | None = None  # fixed by each subclass; accepted as a keyword because PEFT's files carry it
    auto_mapping: dict | None = None  # kept so that a PEFT file round-trips; smolpeft does not read it
    peft_version: str | None = None  # version of the library that wrote the config; filled in when None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    # PEFT fields that change the math when set: accepted at their default (PEFT writes them), refused otherwise.
    _refused: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.task_type is not None and self.task_type not in list(TaskType):
            raise ValueError(
                f"Invalid task type: '{self.task_type}'. "
                f"Must be one of the following task types: {', '.join(TaskType)}."
            )
        if self.task_type is not None:
            self.task_type = TaskType(self.task_type).value
        own = _PEFT_TYPES.get(type(self))
        if own is not None:
            if self.peft_type not in (None, own, own.value):
                warnings.warn(
                    f"{type(self).__name__}: peft_type={self.peft_type!r} replaced by {own.value!r}", stacklevel=3
                )
            self.peft_type = own
        if self.peft_version is None:
            self.peft_version = _current_version()
        defaults = {
            f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(self)
        }
        bad = [f"{k}={getattr(self, k)!r}" for k in self._refused if getattr(self, k) != defaults[k]]
        if bad:
            raise ValueError(f"{type(self).__name__}: {', '.join(bad)} is not supported by smolpeft")

    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        """PEFT's `to_dict`: every field, enums as their plain string values."""
        d = dataclasses.asdict(self)
        return {k: v.value if isinstance(v, enum.Enum) else v for k, v in d.items()}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write `adapter_config.json` (sorted keys, as PEFT) into `save_directory`, creating it."""
        unknown = sorted(set(kwargs) - {"auto_mapping_dict"})
        if unknown:
            raise TypeError(f"save_pretrained() got keyword arguments smolpeft does not support: {', '.join(unknown)}")
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        d = self.to_dict()
        if kwargs.get("auto_mapping_dict") is not None:
            d["auto_mapping"] = kwargs["auto_mapping_dict"]
        d = {k: sorted(v) if isinstance(v, (set, tuple)) else v for k, v in d.items()}
        atomic_write(os.path.join(save_directory, CONFIG_NAME), json.dumps(d, indent=2, sort_keys=True).encode())

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """The raw dict in a config file, without `runtime_config` (PEFT never restores runtime settings)."""
        with open(path_json_file, encoding="utf-8") as f:
            d = json.load(f)
        if "runtime_config" in d:
            warnings.warn("The configuration file contains a `runtime_config` key. This is ignored.", stacklevel=2)
            del d["runtime_config"]
        return d

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> PeftConfig:
        """Build the config class that `peft_type` names (or `cls` without one); unknown fields warn and drop."""
        if "peft_type" not in kwargs and cls is PeftConfig:
            raise TypeError(
                f"The {cls.__name__} config that is trying to be loaded is missing required keys: {{'peft_type'}}."
            )
        return config_from_dict(kwargs, source=cls.__name__, default=cls)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> PeftConfig:
        """Load `adapter_config.json` from a directory or a Hub repo; the class comes from its peft_type."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"revision"}  # revision selects the Hub commit
        class_kwargs = {k: v for k, v in kwargs.items() if k in fields}
        hub_kwargs = {k: v for k, v in kwargs.items() if k not in fields}
        path = config_file(pretrained_model_name_or_path, subfolder, **hub_kwargs)
        d = cls.from_json_file(path)
        if "peft_type" not in d:
            raise TypeError(
                f"The {cls.__name__} config that is trying to be loaded is missing required keys: {{'peft_type'}}."
            )
        return config_from_dict({**class_kwargs, **d}, source=path, default=cls)


@dataclass
class EvaConfig:
    """PEFT's EVA settings (explained-variance rank redistribution), validated as PEFT does. smolpeft builds and saves
    EVA adapters' layers (B = 0 until the data-driven step) and loads trained ones; the step itself,
    `initialize_lora_eva_weights`, is not implemented."""

    rho: float = 2.0  # a layer's rank may grow to r·rho
    tau: float = 0.99  # cosine-similarity threshold that stops the incremental SVD
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ValueError("`rho` must be >= 1.0")
        if self.tau < 0.0 or self.tau > 1.0:
            raise ValueError("`tau` must be between 0.0 and 1.0.")


@dataclass
class CordaConfig:
    """CorDA settings for `preprocess_corda` (smolpeft.corda): which mode picks the adapter's singular directions."""

    cache_file: str | None = None  # decomposition cache (safetensors; PEFT's torch.save pickles are not read)
    covariance_file: str | None = None  # covariance cache, likewise
    corda_method: str | None = "ipm"  # "ipm": the largest components of W·C; "kpm": the smallest
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True  # drop the covariance and sample count from the layers once used

    def __post_init__(self) -> None:
        if self.corda_method not in ("ipm", "kpm", None):  # None: only a cache_file can be used
            raise ValueError(f"Invalid corda_method found: {self.corda_method}, it should be 'ipm' or 'kpm'.")
        # paths as strings, so that the config's JSON form holds them
        self.cache_file = None if self.cache_file is None else os.fspath(self.cache_file)
        self.covariance_file = None if self.covariance_file is None else os.fspath(self.covariance_file)


# init_lora_weights strings smolpeft implements; "pissa_niter_N" (any N >= 0) is PiSSA with a randomized SVD.
LORA_INITS = ("gaussian", "pissa", "olora", "mica", "orthogonal", "corda", "eva")


def _valid_init(init: object) -> bool:
    if isinstance(init, bool):
        return True
    if not isinstance(init, str):
        return False
    if init.startswith("pissa_niter_"):
        return init.removeprefix("pissa_niter_").isdigit()
    return init.lower() in ("olora", "mica") or init in LORA_INITS


@dataclass
class LoraConfig(PeftConfig):
    """LoRA: W x + (lora_alpha / r) · B A x, with B (out×r) zero-initialised so training starts at the base model."""

    r: int = 8
    target_modules: list[str] | str | None = None  # list: exact or dotted-suffix names; str: full-match regex
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False  # set automatically for GPT-2's Conv1D; kept for config compatibility
    bias: str = "none"  # "none", "all" (every bias of the model trains) or "lora_only" (biases of the targeted layers)
    use_dora: bool = False  # DoRA: W' = m · (W + s·B A) / ||W + s·B A||, with a trained magnitude m per output
    lora_bias: bool = False  # lora_B gets a trained bias (merged into the base layer's bias)
    use_rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    modules_to_save: list[str] | None = None  # whole modules trained and saved next to the adapter
    init_lora_weights: bool | str = True  # True, False or one of LORA_INITS (see _valid_init)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # PEFT features smolpeft does not implement: accepted only at these "off" values (see _refused).
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"  # only read by PEFT together with megatron_config
    trainable_token_indices: list[int] | dict | None = None
    loftq_config: dict = field(default_factory=dict)
    eva_config: EvaConfig | None = None  # with init_lora_weights="eva" (a dict from JSON becomes an EvaConfig)
    corda_config: CordaConfig | None = None  # with init_lora_weights="corda", read by preprocess_corda
    lora_ga_config: dict | None = None
    velora_config: dict | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16  # only read by PEFT together with use_qalora
    monteclora_config: dict | None = None
    layer_replication: list[tuple[int, int]] | None = None
    target_parameters: list[str] | None = None
    use_bdlora: dict | None = None
    arrow_config: dict | None = None
    kasa_config: dict | None = None
    ensure_weight_tying: bool = False

    _refused: ClassVar[tuple[str, ...]] = (
        "megatron_config", "trainable_token_indices", "loftq_config", "lora_ga_config",
        "velora_config", "alora_invocation_tokens", "use_qalora", "monteclora_config", "layer_replication",
        "use_bdlora", "arrow_config", "kasa_config",
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias={self.bias!r}; expected 'none', 'all' or 'lora_only'")
        if self.lora_bias and self.init_lora_weights not in (True, False):  # PEFT's two refusals
            raise ValueError(f"lora_bias=True needs init_lora_weights True or False, got {self.init_lora_weights!r}")
        if self.lora_bias and self.use_dora:
            raise ValueError("lora_bias=True is not supported with use_dora=True (as in PEFT)")
        if not _valid_init(self.init_lora_weights):
            raise ValueError(
                f"LoraConfig.init_lora_weights={self.init_lora_weights!r}; expected True, False, 'gaussian', 'pissa', "
                "'pissa_niter_[number of iters]', 'olora', 'mica', 'orthogonal', 'corda' or 'eva'"
            )
        self._check_init_configs()
        for k, v in self.rank_pattern.items():
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{k!r}] must be a positive integer, got {v!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        # PEFT turns name lists into sets (order means nothing); we keep sorted lists, so JSON and errors are stable.
        if isinstance(self.target_modules, (list, set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (list, set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.target_parameters, str):
            raise TypeError("`target_parameters` must be a list of strings or None.")
        if self.layer_replication is not None and not self.layer_replication:
            self.layer_replication = None

    def _check_init_configs(self) -> None:
        """PEFT's warnings for the data-driven inits' sub-configs, and for a PiSSA/OLoRA/CorDA setup whose trained
        adapter cannot later be converted to plain LoRA."""
        init = self.init_lora_weights
        for method, cls in (("eva", EvaConfig), ("corda", CordaConfig)):
            field_name = f"{method}_config"
            value = getattr(self, field_name)
            if init == method and value is None:
                warnings.warn(
                    f"`init_lora_weights` is '{method}' but `{field_name}` is not specified. "
                    f"Using default {method.upper() if method == 'eva' else 'CorDA'} config.",
                    stacklevel=4,
                )
                setattr(self, field_name, cls())
            elif init != method and value is not None:
                warnings.warn(
                    f"`{field_name}` specified but will be ignored when `init_lora_weights` is not '{method}'.",
                    stacklevel=4,
                )
        if isinstance(self.corda_config, dict):  # read from JSON
            self.corda_config = CordaConfig(**self.corda_config)
        if isinstance(self.eva_config, dict):
            self.eva_config = EvaConfig(**self.eva_config)
        mutates_base = isinstance(init, str) and (init.startswith("pissa") or init.lower() in ("olora", "corda"))
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and mutates_base:
            warnings.warn(
                "Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of modified "
                "base weights PiSSA/CorDA/OLoRA/LoRA-GA means that you won't be able to pass "
                "`path_initial_model_for_weight_conversion` to `save_pretrained` to restore the initial values of the "
                "base weights; if you intend to do this, please ensure not to use rslora or "
                "rank_pattern/alpha_pattern.",
                stacklevel=4,
            )

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by PEFT's prompt-learning methods; smolpeft implements one of them, prompt tuning."""

    num_virtual_tokens: int | None = None  # None only until the config is used: PEFT builds it without one too
    token_dim: int | None = None  # filled from the model; checked when loading
    num_transformer_submodules: int | None = None  # always 1 here (decoder-only or encoder-only models)
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None  # PEFT writes the classifier head here for SEQ_CLS

    @property
    def is_prompt_learning(self) -> bool:
        return True


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: `num_virtual_tokens` trainable embeddings prepended to every input."""

    prompt_tuning_init: str = PromptTuningInit.RANDOM.value
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None  # only with prompt_tuning_init="TEXT"; smolpeft refuses it (see _refused)

    _refused: ClassVar[tuple[str, ...]] = ("tokenizer_kwargs",)

    def __post_init__(self) -> None:
        if self.tokenizer_kwargs and self.prompt_tuning_init != PromptTuningInit.TEXT:
            raise ValueError("tokenizer_kwargs only valid when using prompt_tuning_init='TEXT'.")
        super().__post_init__()
        if self.num_virtual_tokens is not None and (
            not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0
        ):
            raise ValueError(
                f"PromptTuningConfig.num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}"
            )
        self.prompt_tuning_init = PromptTuningInit(self.prompt_tuning_init).value
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ValueError(
                "prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path, got "
                f"prompt_tuning_init_text={self.prompt_tuning_init_text!r}, "
                f"tokenizer_name_or_path={self.tokenizer_name_or_path!r}"
            )


_PEFT_TYPES: dict[type, PeftType] = {LoraConfig: PeftType.LORA, PromptTuningConfig: PeftType.PROMPT_TUNING}
_CLASSES: dict[str, type[PeftConfig]] = {t.value: c for c, t in _PEFT_TYPES.items()}


def config_from_dict(d: dict[str, Any], source: str = "config", default: type[PeftConfig] | None = None) -> PeftConfig:
    """Build the config that `d["peft_type"]` names (else `default`); unknown fields are dropped with one warning."""
    peft_type = d.get("peft_type")
    peft_type = peft_type.value if isinstance(peft_type, enum.Enum) else peft_type
    cls = _CLASSES.get(peft_type) if peft_type is not None else default
    if cls is None or cls is PeftConfig:
        raise ValueError(f"{source}: peft_type={peft_type!r} is not supported; expected one of {sorted(_CLASSES)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        # PEFT's message (its tests match the start), then ours: a newer PEFT may write fields we do not know.
        warnings.warn(
            f"Unexpected keyword arguments {unknown} for class {cls.__name__}, these are ignored. "
            f"{source}: ignoring fields {', '.join(unknown)}",
            stacklevel=3,
        )
    try:
        return cls(**{k: v for k, v in d.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


def config_file(path: str | os.PathLike, subfolder: str | None = None, **hub_kwargs: Any) -> str:
    """Path of adapter_config.json in a local directory, else downloaded from the Hub repo `path`."""
    local = os.path.join(path, subfolder) if subfolder else path
    if os.path.isfile(os.path.join(local, CONFIG_NAME)):
        return os.path.join(local, CONFIG_NAME)
    if os.path.isdir(local):
        raise AdapterNotFoundError(
            f"{os.path.join(local, CONFIG_NAME)} is missing; "
            f"an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(str(path), CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
    except Exception as e:
        raise AdapterNotFoundError(f"Can't find '{CONFIG_NAME}' at '{path}' (not a local directory; Hub: {e})") from e


def load_config(directory: str | os.PathLike) -> PeftConfig:
    """The config in a local adapter directory, with errors that name the file."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise AdapterNotFoundError(f"adapter directory not found: {directory}")
    if not os.path.isfile(path):
        raise AdapterNotFoundError(f"{path} is missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        d = PeftConfig.from_json_file(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return config_from_dict(d, source=path)
