"""Training data: built-in tasks, user files through `datasets`, tokenization with loss masks, length-grouped
batches."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

import torch

from .config import TaskType
from .loss import IGNORE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUILTIN = ("sentiment", "topic", "intent", "chat")
DEFAULT_CHAT_TEMPLATE = (  # used when a tokenizer has none: plain role headers, one turn per block
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class Dataset:
    """Rows of one task: `kind` is TaskType.SEQ_CLS (text/label) or TaskType.CAUSAL_LM (messages,
    prompt/completion or text)."""

    train: list[dict]
    eval: list[dict]
    kind: TaskType
    labels: list[str] = field(default_factory=list)
    name: str = ""


def _task_dir(name: str):
    return resources.files("smolpeft") / "tasks" / name


def _read_jsonl(path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_builtin(name: str) -> Dataset:
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in task {name!r}; built-in tasks: {', '.join(BUILTIN)}")
    d = _task_dir(name)
    train, test = _read_jsonl(d / "train.jsonl"), _read_jsonl(d / "test.jsonl")
    if name == "chat":
        return Dataset(train, test, TaskType.CAUSAL_LM, name=name)
    labels = json.loads((d / "labels.json").read_text())
    return Dataset(train, test, TaskType.SEQ_CLS, labels, name)


def _schema(row: dict, index: int, source: str) -> str:
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row and "label" in row:
        return "text_label"
    if "text" in row:
        return "text"
    raise ValueError(
        f"{source}: row {index} has fields {sorted(row)}; "
        "expected 'messages', 'prompt'+'completion', 'text'+'label' or 'text'"
    )


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSONL file; a line that is not UTF-8 or not a JSON object is reported by file and line."""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}: line {n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {n}: expected a JSON object, found {type(row).__name__}")
            rows.append(row)
    return rows


def check_utf8(path: str) -> None:
    """Name the line of the first bytes that are not UTF-8 (the CSV and JSON readers only say that some are)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}: line {n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
                ) from None


def load_user_data(spec: str, eval_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """A local JSONL/JSON/CSV/Parquet file (a directory of them) or a Hub dataset name, read with `datasets`
    (JSONL is read here, without importing `datasets` and its pandas/pyarrow stack: a second of start-up)."""
    ext = os.path.splitext(spec)[1].lower().lstrip(".")
    builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
    if os.path.exists(spec) and builder is None and not os.path.isdir(spec):
        raise ValueError(f"{spec}: unsupported file type {ext!r}; use .jsonl, .json, .csv or .parquet")
    local = os.path.isfile(spec)
    if local and os.path.getsize(spec) == 0:
        raise ValueError(f"{spec}: the file is empty; expected one example per row")
    if local and ext == "jsonl":  # read here: errors then name the line, and rows may differ in their fields
        ds = {"train": read_jsonl(spec)}
    else:
        import datasets

        if local and ext in ("json", "csv"):
            check_utf8(spec)
        try:
            loaded = datasets.load_dataset(builder, data_files=spec) if builder else datasets.load_dataset(spec)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data not found: {spec} ({e})") from e
        except Exception as e:  # the readers' own errors (pyarrow, pandas) do not say which file
            if not local:
                raise
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{spec}: could not be read as {ext.upper()}: {detail}") from e
        ds = {name: split.to_list() for name, split in loaded.items()}
    train = [r | {"_row": i} for i, r in enumerate(ds["train"])]  # errors name the row of the file
    if not train:
        raise ValueError(f"{spec}: no rows")
    evals = next((ds[s] for s in ("test", "validation") if s in ds), None)
    if evals is None and len(train) < 2:
        raise ValueError(f"{spec}: 1 row; need at least 2, as a seeded slice is held out for evaluation")
    if evals is None:  # hold out a seeded slice so eval never sees training rows
        idx = list(range(len(train)))
        random.Random(seed).shuffle(idx)
        k = max(1, int(len(train) * eval_fraction))
        evals, train = [train[i] for i in idx[:k]], [train[i] for i in idx[k:]]
    kind = _schema(train[0], 0, spec)
    if kind == "text_label":
        labels = sorted({str(r["label"]) for r in train + evals})
        return Dataset(train, evals, TaskType.SEQ_CLS, labels, spec)
    return Dataset(train, evals, TaskType.CAUSAL_LM, name=spec)


def load_data(data: str | None, task: str | None, labels: list[str] | None = None) -> Dataset:
    """`labels` fixes the label set and order of a classification head (say, one head shared by several tasks)."""
    if data and task:
        raise ValueError("give data or task, not both")
    ds = load_user_data(data) if data else load_builtin(task or "sentiment")
    if labels:
        if ds.kind != TaskType.SEQ_CLS:
            raise ValueError("labels apply to classification data (text/label)")
        missing = sorted(set(ds.labels) - set(labels))
        if missing:
            raise ValueError(f"the data has labels {missing} that are not in labels={labels}")
        ds.labels = list(labels)
    return ds


def _field(row: dict, key: str, i: int, source: str, kind: type | tuple = str):
    if key not in row or row[key] is None:
        raise ValueError(f"{source}: row {i}: missing field {key!r}")
    if not isinstance(row[key], kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{source}: row {i}: field {key!r} must be {expected}, found {type(row[key]).__name__}")
    return row[key]


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], **kw) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template (a plain default when it has none)."""
    template = None if tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE
    out = tokenizer.apply_chat_template(messages, tokenize=True, chat_template=template, **kw)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def encode_lm_row(
    row: dict, i: int, tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool, source: str
) -> tuple[list[int], list[int]]:
    """Token ids and labels; labels are IGNORE on prompt tokens unless train_on_prompt."""
    schema = _schema(row, i, source)
    if schema == "messages":
        msgs = _field(row, "messages", i, source, list)
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{source}: row {i}: field 'messages[{j}]' needs string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{source}: row {i}: field 'messages' has no assistant turn to learn from")
        ids = render_chat(tokenizer, msgs)
        labels = list(ids) if train_on_prompt else [IGNORE] * len(ids)
        if not train_on_prompt:
            # An assistant turn's tokens are what the conversation up to it adds after the generation prompt.
            for j, m in enumerate(msgs):
                if m["role"] == "assistant":
                    start = len(render_chat(tokenizer, msgs[:j], add_generation_prompt=True))
                    end = len(render_chat(tokenizer, msgs[: j + 1]))
                    labels[start:end] = ids[start:end]
        return ids, labels
    if schema == "prompt_completion":
        p = tokenizer(_field(row, "prompt", i, source))["input_ids"]
        c = tokenizer(_field(row, "completion", i, source), add_special_tokens=False)["input_ids"]
        c = c + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else c
        return p + c, (p if train_on_prompt else [IGNORE] * len(p)) + c
    ids = tokenizer(_field(row, "text", i, source))["input_ids"]
    return ids, list(ids)


# Texts are cut to this many characters per kept token before tokenizing, so a huge row costs no more than a long
# one: a token rarely spans more than ~20 characters (long whitespace or symbol runs), so the first max_length
# tokens are those of the whole text, and memory stays bounded by max_length, not by the row.
CHARS_PER_TOKEN = 64


def bound_text(row: dict, max_chars: int) -> dict:
    """A row whose strings (also inside messages) are cut to max_chars characters."""

    def cut(v):
        if isinstance(v, str):
            return v[:max_chars]
        if isinstance(v, list):
            return [cut(x) for x in v]
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        return v

    return {k: cut(v) for k, v in row.items()}


def encode(
    ds: Dataset, split: str, tokenizer: PreTrainedTokenizerBase, max_length: int, train_on_prompt: bool = False
) -> tuple[list[dict], int]:
    """Tokenize a split; returns examples and how many were truncated to max_length."""
    rows = ds.train if split == "train" else ds.eval
    # User files carry their own row numbers ("_row"); built-in splits are separate files, so name the split.
    source = ds.name or "data"
    if rows and "_row" not in rows[0]:
        source = f"{source} ({split})"
    out, truncated = [], 0
    label_id = {name: k for k, name in enumerate(ds.labels)}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {i} is not an object")
        i = row.get("_row", i)
        row = bound_text(row, max_length * CHARS_PER_TOKEN)
        if ds.kind == TaskType.SEQ_CLS:
            text = _field(row, "text", i, source)
            label = str(_field(row, "label", i, source, (str, int)))
            if label not in label_id:
                raise ValueError(f"{source}: row {i}: field 'label' is {label!r}; known labels: {', '.join(ds.labels)}")
            ids = tokenizer(text, truncation=False)["input_ids"]
            ex = {"input_ids": ids, "label": label_id[label]}
        else:
            ids, labels = encode_lm_row(row, i, tokenizer, train_on_prompt, source)
            ex = {"input_ids": ids, "labels": labels}
        if len(ids) > max_length:
            truncated += 1
            ex = {k: (v[:max_length] if isinstance(v, list) else v) for k, v in ex.items()}
        out.append(ex)
    return out, truncated


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of similar length: sort within windows of 50 batches, then shuffle the batches.

    Depends only on (seed, epoch), so a resumed run replays the same order and skips what it has done.
    """
    rng = random.Random(seed * 100_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * 50
    batches = []
    for w in range(0, len(idx), window):
        chunk = sorted(idx[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate LM examples into rows of up to max_length tokens. position_ids restart at 0 for each example,
    which transformers turns into a block-diagonal causal mask: no token attends across examples. The first
    token of each example is not a target (it would be predicted from the previous example)."""
    rows, cur = [], {"input_ids": [], "labels": [], "position_ids": []}
    for e in examples:
        n = len(e["input_ids"])
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_length:
            rows.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += e["input_ids"]
        cur["labels"] += [IGNORE] + e["labels"][1:]
        cur["position_ids"] += list(range(n))
    if cur["input_ids"]:
        rows.append(cur)
    return rows


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row of this batch. Packed rows get no attention mask: their position_ids
    carry the sequence boundaries, and padding forms its own short sequence with no targets."""
    if "position_ids" in examples[0]:
        n = max(len(e["input_ids"]) for e in examples)
        out = {
            k: torch.full((len(examples), n), v, dtype=torch.long)
            for k, v in (("input_ids", pad_id), ("labels", IGNORE), ("position_ids", 0))
        }
        for r, e in enumerate(examples):
            m = len(e["input_ids"])
            for k in out:
                out[k][r, :m] = torch.tensor(e[k])
            out["position_ids"][r, m:] = torch.arange(n - m)
        return out
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for r, e in enumerate(examples):
        ids[r, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[r, : len(e["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "labels" in examples[0]:
        labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
        for r, e in enumerate(examples):
            labels[r, : len(e["labels"])] = torch.tensor(e["labels"])
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([e["label"] for e in examples])
    return batch
