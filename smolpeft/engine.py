"""Engine: one base model and many LoRA adapters decoded in one shared batch, with no web code in it.

The `Engine` owns the model and runs a decode loop on its own thread. Between steps it admits waiting requests
(each prefilled alone, with its own adapter) and lets finished or cancelled ones leave; each step is ONE forward
over every active request with one adapter per row (`adapter_names=[...]`), so requests for different adapters
share the pass. The batch keeps one left-padded KV cache, rebuilt only when rows join or leave; a 2D attention
mask and per-row position ids make each row compute what it would compute alone.

Registered adapters are known by their directory. With `max_loaded_adapters`, at most that many are in the model's
LoRA layers (on the model's device) at once: a request for another one loads it from its files when it is admitted,
evicting the least recently used adapter that no running row uses, and waits in the queue while every slot is held
by running rows (the requests behind it wait too: the queue keeps its order, so no request starves). The host-side
store is the files themselves, so registering adapters costs no memory; a file changed since its registration is
refused when it would be loaded back, so an evicted adapter returns exactly as it was served.

Every refusal and failure is an `EngineError` with a `Reason`; `serve.py` maps reasons to HTTP status codes. A
failure that belongs to one request (its sampling, its non-finite logits, its prefill) ends that request only.
"""

from __future__ import annotations

import collections
import copy
import enum
import inspect
import json
import logging
import math
import os
import random
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import lora
from .checkpoint import BIN_NAME, read_header, read_weights
from .config import CONFIG_NAME, WEIGHTS_NAME, load_config
from .data import render_chat
from .lora import BASE
from .model import PeftModel

log = logging.getLogger("smolpeft.engine")


class Reason(str, enum.Enum):
    """Why the engine refused or ended a request; the HTTP layer picks a status code from it."""

    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    CONTEXT_LENGTH = "context_length"
    CONFLICT = "conflict"
    FORBIDDEN = "forbidden"
    OVERLOADED = "overloaded"  # the waiting queue is full
    UNAVAILABLE = "unavailable"  # shutting down
    INTERNAL = "internal"


class EngineError(Exception):
    def __init__(self, reason: Reason, message: str, param: str | None = None):
        message = clip(message, 1000)
        super().__init__(message)
        self.reason, self.message, self.param = reason, message, param


def clip(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters and made encodable as UTF-8: error messages quote client input, which may be
    megabytes long or hold lone surrogates that no JSON encoder can write as UTF-8."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: up to the model's context
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Request:
    """One generation. The engine thread writes `text` and then `finish_reason`, and calls `notify` after each."""

    prompt_ids: list[int]
    adapter: str  # an adapter name, or BASE for the plain base model
    params: SamplingParams
    notify: Callable[[], None] = lambda: None
    out_ids: list[int] = field(default_factory=list)
    text: str = ""  # output that is final: stop strings cut off, a partial character or stop-string prefix held back
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: EngineError | None = None  # when finish_reason == "error"
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None


@dataclass
class _Layout:
    """Where every plain LoRA adapter of one config (no DoRA, lora_bias, embedding targets, whole-module copies or
    PiSSA) puts its tensors, read off the first such adapter the full loader loaded. Later adapters of that config
    load by adding factors to these layers and copying the file's tensors in, and leave by deleting them: no walk
    over the model's modules, whose number grows with every adapter loaded (a full load with 64 adapters in the
    SmolLM2-135M shape took seconds)."""

    targets: list[tuple[str, int, float]]  # (module path in the base model, r, alpha)
    shapes: dict[str, tuple[int, ...]]  # the weights file's keys and shapes, exactly
    fp32: bool  # the factors' dtype is float32 (else the base's)


class Engine:
    """A causal LM (a PeftModel once it has adapters) and the decode loop that serves it.

    `max_waiting` bounds the queue of admitted requests that wait for a batch slot; `max_prompt_tokens` bounds a
    prompt (default: the model's context); `max_loaded_adapters` bounds the adapters held in the model at once
    (default: every registered adapter stays loaded)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        name: str,
        max_batch: int = 8,
        max_waiting: int = 256,
        max_prompt_tokens: int | None = None,
        max_loaded_adapters: int | None = None,
    ):
        if max_batch < 1 or max_waiting < 0:
            raise ValueError(f"max_batch must be >= 1 and max_waiting >= 0, got {max_batch} and {max_waiting}")
        built_in = list(getattr(model, "peft_config", {}))
        if max_loaded_adapters is not None and max_loaded_adapters <= len(built_in):
            # The model's own adapters have no files to reload from, so they never leave; a slot must remain.
            raise ValueError(
                f"max_loaded_adapters must be > {len(built_in)} (the adapters the model came with), "
                f"got {max_loaded_adapters}"
            )
        self.max_loaded = max_loaded_adapters
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch, self.max_waiting = max_batch, max_waiting
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        kinds = set(getattr(text_config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise ValueError(f"serve batches full-attention models only; {name} has layer types {sorted(kinds)}")
        self.context = int(getattr(text_config, "max_position_embeddings", None) or tokenizer.model_max_length)
        self.max_prompt_tokens = min(max_prompt_tokens or self.context, self.context - 1)
        self.vocab_size = int(text_config.vocab_size)
        # No token spells more characters than the longest vocabulary entry, so a text longer than that many times
        # the token limit is too long; refusing it by its length saves tokenizing megabytes only to refuse them.
        self._longest_token = max(map(len, tokenizer.get_vocab()), default=1)
        eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.device = next(model.parameters()).device
        params = inspect.signature(base.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
        self._keep_arg = "logits_to_keep" if "logits_to_keep" in params else None
        self.adapter_paths: dict[str, str] = dict.fromkeys(built_in, "")  # registered adapters ("": no files)
        self._stamps: dict[str, tuple] = {}  # each registered adapter's files when registered (see _stamp)
        self._layouts: dict[str, _Layout | None] = {}  # by config (see _signature); None: load in full
        self._layout_of: dict[str, _Layout | None] = {}  # by registered adapter
        # The adapters in the model's layers, least recently used first: the "device" set.
        self._loaded: collections.OrderedDict[str, None] = collections.OrderedDict.fromkeys(built_in)
        self.stats = {
            "steps": 0,
            "mixed_steps": 0,
            "prefills": 0,
            "tokens": 0,
            "max_rows": 0,
            "cancelled": 0,
            "errors": 0,
            "active": 0,
            "waiting": 0,
            "loaded_adapters": len(built_in),
            "adapter_loads": 0,  # loads of an evicted adapter back into the model (registration not counted)
            "adapter_evictions": 0,
        }
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._calls: list[tuple[Callable, Future]] = []
        self._rows: list[Request] = []  # the batch, in the row order of the cache
        self._cache = None
        self._mask: torch.Tensor | None = None  # rows × cached positions: 0 on left padding
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def load(
        cls,
        model: str,
        adapters: dict[str, str] | None = None,
        quantize: str | None = None,
        max_batch: int = 8,
        device: str | None = None,
        **limits,
    ) -> Engine:
        """The base from a directory or Hub id (4-bit NF4 with quantize="nf4"), with the named adapters loaded.
        `device` defaults to CUDA when there is one; `limits` are Engine's max_waiting, max_prompt_tokens and
        max_loaded_adapters."""
        from .config import TaskType
        from .loader import load

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        base, tokenizer, _, _ = load(model, task_type=TaskType.CAUSAL_LM, quantize=quantize, device=device)
        engine = cls(base, tokenizer, model, max_batch, **limits)
        for name, path in (adapters or {}).items():
            engine.load_adapter(name, path)
        return engine

    @property
    def adapters(self) -> list[str]:
        return list(self.adapter_paths)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- turning client input into a request (any thread; CPU work, so not on an event loop) ---

    def resolve(self, model: str) -> str:
        """The adapter that serves the model name `model`: BASE for the engine's own name."""
        if model == self.name:
            return BASE
        if model in self.adapter_paths:
            return model
        served = ", ".join([self.name, *self.adapters])
        raise EngineError(
            Reason.NOT_FOUND, f"model {clip(repr(model))} does not exist; this server has: {served}", "model"
        )

    def encode(self, text: str) -> list[int]:
        self._check_length(len(text), "prompt")
        _check_text(text, "prompt")
        return self.tokenizer(text)["input_ids"]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        self._check_length(sum(len(m["role"]) + len(m["content"]) for m in messages), "messages")
        for m in messages:
            _check_text(m["role"] + m["content"], "messages")
        try:
            return render_chat(self.tokenizer, messages, add_generation_prompt=True)
        except Exception as e:  # a template may refuse the conversation (roles out of order, say)
            raise EngineError(Reason.BAD_REQUEST, f"the chat template rejected the messages: {e}", "messages") from None

    def _check_length(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_tokens * self._longest_token:
            raise EngineError(
                Reason.CONTEXT_LENGTH,
                f"the prompt has {chars} characters, more than {self.max_prompt_tokens} tokens can spell",
                param,
            )

    def check(self, req: Request) -> None:
        """Refuse a request the engine cannot run, with the reason; fill in max_tokens and the sampler's seed."""
        ids, p = req.prompt_ids, req.params
        if req.adapter != BASE and req.adapter not in self.adapter_paths:
            raise EngineError(Reason.NOT_FOUND, f"adapter {clip(repr(req.adapter))} is not loaded", "model")
        if not ids:
            raise EngineError(Reason.BAD_REQUEST, "the prompt is empty", "prompt")
        if len(ids) > self.max_prompt_tokens:
            raise EngineError(
                Reason.CONTEXT_LENGTH,
                f"the prompt has {len(ids)} tokens; this server takes up to "
                f"{self.max_prompt_tokens} (model context {self.context})",
                "prompt",
            )
        bad = [t for t in ids if type(t) is not int or not 0 <= t < self.vocab_size]
        if bad:
            raise EngineError(
                Reason.BAD_REQUEST,
                f"token ids {clip(repr(bad[:5]))} are outside the vocabulary (0..{self.vocab_size - 1})",
                "prompt",
            )
        if p.max_tokens is None:
            p.max_tokens = self.context - len(ids)
        if type(p.max_tokens) is not int or p.max_tokens < 1:
            raise EngineError(
                Reason.BAD_REQUEST, f"max_tokens must be a positive integer, got {p.max_tokens!r}", "max_tokens"
            )
        if len(ids) + p.max_tokens > self.context:
            raise EngineError(
                Reason.CONTEXT_LENGTH,
                f"{len(ids)} prompt tokens + max_tokens {p.max_tokens} exceed "
                f"this model's context of {self.context} tokens",
                "max_tokens",
            )
        if not (math.isfinite(p.temperature) and 0 <= p.temperature <= 2):
            raise EngineError(
                Reason.BAD_REQUEST, f"temperature must be in [0, 2], got {p.temperature!r}", "temperature"
            )
        if not (math.isfinite(p.top_p) and 0 < p.top_p <= 1):
            raise EngineError(Reason.BAD_REQUEST, f"top_p must be in (0, 1], got {p.top_p!r}", "top_p")
        if len(p.stop) > 4 or any(not isinstance(s, str) or not s for s in p.stop):
            raise EngineError(
                Reason.BAD_REQUEST, f"stop takes up to 4 non-empty strings, got {clip(repr(p.stop))}", "stop"
            )
        for s in p.stop:
            _check_text(s, "stop")
        if p.seed is not None and not (type(p.seed) is int and -(2**63) <= p.seed < 2**64):
            raise EngineError(
                Reason.BAD_REQUEST, f"seed must be an integer in [-2**63, 2**64), got {clip(str(p.seed))}", "seed"
            )
        if p.temperature > 0:
            seed = p.seed % 2**64 if p.seed is not None else random.getrandbits(63)  # torch takes 0..2**64-1
            req.generator = torch.Generator().manual_seed(seed)

    # --- what other threads call ---

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="smolpeft-decode", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
        for req in [*self._rows, *self._waiting]:
            self._finish(req, "error", error=EngineError(Reason.UNAVAILABLE, "the server is shutting down"))
        self._rows, self._waiting, self._cache, self._mask = [], collections.deque(), None, None

    def submit(self, req: Request) -> Request:
        """Queue a request, or raise EngineError if it is invalid or the queue is full."""
        self.check(req)
        with self._cv:
            if self._stopping:
                raise EngineError(Reason.UNAVAILABLE, "the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise EngineError(Reason.OVERLOADED, f"{len(self._waiting)} requests are waiting already; retry later")
            self._waiting.append(req)
            self._cv.notify()
        return req

    def generate(self, prompt_ids: list[int], adapter: str, params: SamplingParams) -> Request:
        """Submit and wait: a blocking helper for scripts and tests."""
        req = self.submit(Request(list(prompt_ids), adapter, params))
        req.done.wait()
        return req

    def cancel(self, req: Request) -> None:
        """Free the request's slot at the next step (a client went away)."""
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    def load_adapter(self, name: str, path: str) -> None:
        """Register a LoRA adapter (safetensors only) under `name`: it is loaded in full, so bad files are refused
        here, and then stays loaded unless the cache of `max_loaded_adapters` needs its slot. The model is back in
        eval mode afterwards."""
        _check_text(name, "name")
        if name in (self.name, BASE) or name in self.adapter_paths:
            raise EngineError(Reason.CONFLICT, f"model {clip(repr(name))} already exists; delete it first", "name")
        _check_adapter_files(path)
        self._call(lambda: self._load(name, path))

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapter_paths:
            loaded = ", ".join(self.adapters) or "(none)"
            raise EngineError(Reason.NOT_FOUND, f"adapter {clip(repr(name))} is not loaded; loaded: {loaded}", "name")
        self._call(lambda: self._delete(name))

    def _call(self, fn: Callable):
        """Run fn on the decode thread between steps: only that thread touches the model once it runs."""
        if not self.alive:
            return fn()
        fut: Future = Future()
        with self._cv:
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut.result()

    # --- the decode loop (its own thread) ---

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._calls or self._rows or self._waiting):
                    self._cv.wait()
                if self._stopping:
                    return
                calls, self._calls = self._calls, []
            for fn, fut in calls:
                try:
                    fut.set_result(fn())
                except Exception as e:
                    fut.set_exception(e)
            with self._cv:
                new = []
                plan = collections.OrderedDict(self._loaded)  # the loaded set once this round's requests are placed
                while self._waiting and len(self._rows) + len(new) < self.max_batch:
                    req = self._waiting[0]
                    if req.cancelled:
                        self._finish(self._waiting.popleft(), "cancelled")
                    elif req.adapter != BASE and req.adapter not in self.adapter_paths:
                        error = EngineError(Reason.NOT_FOUND, f"adapter {req.adapter!r} was unloaded", "model")
                        self._fail(self._waiting.popleft(), error)
                    elif self._place(req.adapter, plan, new):
                        new.append(self._waiting.popleft())
                    else:  # every slot holds an adapter that a running row uses: wait (in order) for one to finish
                        break
            try:
                self._leave()
                new = self._apply(plan, new)
                self._join(new)
                if self._rows:
                    self._step()
                    self._leave()  # free finished rows now, not at the next request
            except Exception as e:  # a batched forward failed: no one request is to blame, so fail the batch
                log.exception("decode step failed; failing %d requests", len(self._rows) + len(new))
                for req in [*self._rows, *new]:
                    self._fail(req, EngineError(Reason.INTERNAL, f"generation failed: {type(e).__name__}: {e}"))
                self._rows, self._cache, self._mask = [], None, None
            self.stats["active"], self.stats["waiting"] = len(self._rows), len(self._waiting)
            self.stats["loaded_adapters"] = len(self._loaded)

    def _place(self, name: str, plan: collections.OrderedDict, new: list[Request]) -> bool:
        """Give adapter `name` a slot in `plan` (the loaded set, least recently used first), evicting the least
        recently used adapter that no running or admitted row uses; False if there is none to evict."""
        if name == BASE:
            return True
        if name not in plan and self.max_loaded is not None and len(plan) >= self.max_loaded:
            busy = {r.adapter for r in [*self._rows, *new]}
            victim = next((n for n in plan if n not in busy and self.adapter_paths[n]), None)
            if victim is None:
                return False
            del plan[victim]
        plan[name] = None
        plan.move_to_end(name)
        return True

    def _apply(self, plan: collections.OrderedDict, new: list[Request]) -> list[Request]:
        """Make the model hold exactly the adapters of `plan`: evict the others, load the missing ones from their
        files. A load that fails fails the requests for that adapter only; the others are returned."""
        for name in [n for n in self._loaded if n not in plan]:
            self._evict(name)
        for name in [n for n in plan if n not in self._loaded]:
            try:
                self._reload(name)
            except Exception as e:
                for req in [r for r in new if r.adapter == name]:
                    self._fail(req, e)
        new = [r for r in new if r.finish_reason is None]
        for req in new:
            if req.adapter in self._loaded:
                self._loaded.move_to_end(req.adapter)
        return new

    def _reload(self, name: str) -> None:
        """Load evicted adapter `name` back from its files, refusing files changed since registration: the
        adapter must come back as it was served before."""
        path = self.adapter_paths[name]
        if _stamp(path) != self._stamps[name]:
            raise EngineError(
                Reason.CONFLICT,
                f"the files of adapter {name!r} ({clip(path, 200)}) changed since it was registered; "
                "delete it and load it again",
                "model",
            )
        self._into_model(name, path)
        self._loaded[name] = None
        self.stats["adapter_loads"] += 1
        log.debug("loaded adapter %s back from %s", name, path)

    def _evict(self, name: str) -> None:
        layout = self._layout_of.get(name)
        if layout is None:
            self.model.delete_adapter(name)
        else:
            # The model's active adapter may still name it: harmless, as every forward names each row's adapter
            # and a layer skips names it does not hold. The emptied wrappers stay for the next adapter.
            inner = self.model.get_base_model()
            for target, _, _ in layout.targets:
                inner.get_submodule(target).delete(name)
            del self.model.peft_config[name]
        del self._loaded[name]
        self.stats["adapter_evictions"] += 1
        log.debug("evicted adapter %s", name)

    def _forward(self, ids: torch.Tensor, names: list[str], cache, **kw):
        if isinstance(self.model, PeftModel):
            kw["adapter_names"] = names  # one adapter per row; BASE rows get none
        return self.model(input_ids=ids, use_cache=True, **{self._cache_arg: cache}, **kw)

    @torch.inference_mode()
    def _join(self, new: list[Request]) -> None:
        """Prefill each new request alone, then left-pad its cache and the batch's to one length and stack them."""
        from transformers import DynamicCache

        parts, joined = [], []
        for req in new:
            cache = DynamicCache()
            ids = torch.tensor([req.prompt_ids], device=self.device)
            out = self._forward(ids, [req.adapter], cache, **({self._keep_arg: 1} if self._keep_arg else {}))
            self.stats["prefills"] += 1
            self._next([req], out.logits[:, -1])
            if req.finish_reason is None:  # a request can end (or fail) on its first token
                parts.append((_layers(cache), torch.ones(1, len(req.prompt_ids), dtype=torch.long, device=self.device)))
                joined.append(req)
        if not parts:
            return
        if self._rows:
            parts.insert(0, (_layers(self._cache), self._mask))
        self._rows += joined
        T = max(mask.shape[1] for _, mask in parts)
        layers = [
            tuple(torch.cat([F.pad(kv[i][j], (0, 0, T - m.shape[1], 0)) for kv, m in parts]) for j in (0, 1))
            for i in range(len(parts[0][0]))
        ]
        self._cache = _cache(layers)
        self._mask = torch.cat([F.pad(m, (T - m.shape[1], 0)) for _, m in parts])

    @torch.inference_mode()
    def _leave(self) -> None:
        """Drop finished and cancelled rows from the batch and the padding columns no remaining row needs."""
        for req in self._rows:
            if req.cancelled and req.finish_reason is None:
                self._finish(req, "cancelled")
        keep = [i for i, req in enumerate(self._rows) if req.finish_reason is None]
        if len(keep) == len(self._rows):
            return
        for req in self._rows:
            if req.finish_reason is not None and req.adapter in self._loaded:
                self._loaded.move_to_end(req.adapter)  # recency is the last use, not the admission
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        idx = torch.tensor(keep, device=self.device)
        mask = self._mask[idx]
        start = mask.shape[1] - int(mask.sum(1).max())
        self._mask = mask[:, start:]
        self._cache = _cache([(k[idx, :, start:], v[idx, :, start:]) for k, v in _layers(self._cache)])

    @torch.inference_mode()
    def _step(self) -> None:
        """One forward for every active row: its last token in, one new token out."""
        rows = self._rows
        names = [r.adapter for r in rows]
        ids = torch.tensor([[r.out_ids[-1]] for r in rows], device=self.device)
        positions = self._mask.sum(1, keepdim=True)  # real tokens before this one; the left padding does not count
        self._mask = F.pad(self._mask, (0, 1), value=1)
        out = self._forward(ids, names, self._cache, attention_mask=self._mask, position_ids=positions)
        self._next(rows, out.logits[:, -1])
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        mix = collections.Counter(names)
        if len(mix) > 1:
            self.stats["mixed_steps"] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("step %d: %d rows, adapters %s", self.stats["steps"], len(rows), dict(mix))

    def _next(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Pick and append each request's next token; whatever goes wrong for one request ends that request only."""
        logits = logits.float()
        tops, greedy = logits.max(-1).values.tolist(), logits.argmax(-1).tolist()  # a max is NaN if any logit is
        for i, req in enumerate(reqs):
            try:
                if not math.isfinite(tops[i]):
                    raise EngineError(
                        Reason.INTERNAL,
                        "the model produced non-finite logits (NaN or inf) for this "
                        f"request; adapter {req.adapter!r} may hold broken weights",
                    )
                self._append(req, greedy[i] if req.params.temperature == 0 else self._sample(logits[i], tops[i], req))
            except Exception as e:
                if not isinstance(e, EngineError):
                    log.exception("request failed while sampling")
                self._fail(req, e)

    def _sample(self, logits: torch.Tensor, top: float, req: Request) -> int:
        p = req.params
        # Subtracting the max first keeps a tiny temperature finite: every scaled logit is <= 0, the max's is 0.
        probs = torch.softmax((logits - top) / p.temperature, -1).cpu()
        if p.top_p < 1:  # nucleus: the most likely tokens until their mass reaches top_p
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=req.generator))

    def _append(self, req: Request, token: int) -> None:
        req.out_ids.append(token)
        self.stats["tokens"] += 1
        p = req.params
        eos = token in self.eos
        text = self.tokenizer.decode(req.out_ids[:-1] if eos else req.out_ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in p.stop if s in text]
        if cuts:
            return self._finish(req, "stop", text[: min(cuts)])
        if eos:
            return self._finish(req, "stop", text)
        if len(req.out_ids) >= p.max_tokens or len(req.prompt_ids) + len(req.out_ids) >= self.context:
            return self._finish(req, "length", text)
        # Stream only what is final: a partial UTF-8 character decodes to U+FFFD, and the end may begin a stop string.
        hold = max((len(s) - 1 for s in p.stop), default=0)
        safe = text[: len(text) - hold].rstrip("\ufffd")
        if len(safe) > len(req.text) and safe.startswith(req.text):
            req.text = safe
            _notify(req)

    def _fail(self, req: Request, e: Exception) -> None:
        error = e if isinstance(e, EngineError) else EngineError(Reason.INTERNAL, f"{type(e).__name__}: {e}")
        if req.finish_reason is None:
            self.stats["errors"] += 1
        self._finish(req, "error", error=error)

    def _finish(self, req: Request, reason: str, text: str | None = None, error: EngineError | None = None) -> None:
        if req.finish_reason is not None:
            return
        if text is not None:
            req.text = text
        req.error = error
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        req.finish_reason = reason  # written last: readers that see it see the final text
        req.done.set()
        _notify(req)

    def _load(self, name: str, path: str) -> None:
        stamp = _stamp(path)  # before reading: a change during the load shows up as a mismatch later
        self._into_model(name, path)
        self.adapter_paths[name], self._stamps[name] = path, stamp
        self._loaded[name] = None
        busy = {r.adapter for r in self._rows}
        while self.max_loaded is not None and len(self._loaded) > self.max_loaded:
            # The new adapter has files and no rows, so there is always a victim; it may be the new one itself.
            self._evict(next(n for n in self._loaded if n not in busy and self.adapter_paths[n]))
        self.stats["loaded_adapters"] = len(self._loaded)
        log.info("loaded adapter %s from %s", name, path)

    def _into_model(self, name: str, path: str) -> None:
        signature = _signature(path)
        layout = self._layouts.get(signature)
        if layout is not None and self._fits(layout):
            try:
                self._add(name, path, layout)
            except Exception as e:
                raise EngineError(
                    Reason.BAD_REQUEST, f"could not load adapter {name!r}: {type(e).__name__}: {e}", "path"
                ) from None
            self._layout_of[name] = layout
            return
        self._load_in_full(name, path)
        layout = self._layouts.get(signature) or self._read_layout(name, path)
        if signature is not None and signature not in self._layouts:
            self._layouts[signature] = layout
        self._layout_of[name] = layout

    def _fits(self, layout: _Layout) -> bool:
        """The layout's layers still hold LoRA wrappers (a full delete removes a wrapper left with no adapter)."""
        if not isinstance(self.model, PeftModel):
            return False
        inner = self.model.get_base_model()
        return all(isinstance(inner.get_submodule(t), lora.LoraLayer) for t, _, _ in layout.targets)

    def _add(self, name: str, path: str, layout: _Layout) -> None:
        """Load adapter `name` along `layout`: its file must hold exactly the layout's tensors."""
        file = os.path.join(path, WEIGHTS_NAME)
        shapes = {k: s for k, (_, s) in read_header(file).items()}
        if shapes != layout.shapes:
            odd = sorted(set(shapes.items()) ^ set(layout.shapes.items()))[:3]
            raise ValueError(f"{file}: its tensors differ from what its config describes, e.g. {odd}")
        config = load_config(path)
        config.inference_mode = True
        weights = read_weights(path, device=self.device)
        bare = copy.copy(config)
        bare.init_lora_weights = False  # the factors are overwritten at once; dropout is off when serving
        inner = self.model.get_base_model()
        layers = [inner.get_submodule(t) for t, _, _ in layout.targets]
        try:
            with torch.no_grad():
                for (target, r, alpha), layer in zip(layout.targets, layers):
                    layer.add(name, r, alpha, 0.0, bare, fp32=layout.fp32)
                    for key, factor in zip(("lora_A", "lora_B"), layer.factors(name)):
                        factor.copy_(weights[f"base_model.model.{target}.{key}.weight"])
                        factor.requires_grad_(False)
                    for part in (layer.lora_A, layer.lora_B, layer.lora_dropout):
                        part[name].eval()
        except BaseException:
            for layer in layers:
                layer.delete(name)
            raise
        self.model.peft_config[name] = config

    def _read_layout(self, name: str, path: str) -> _Layout | None:
        """The layout of adapter `name`, just loaded in full, or None if it is not plain LoRA."""
        config, inner = self.model.peft_config[name], self.model.get_base_model()
        if (
            config.use_dora
            or config.lora_bias
            or config.init_lora_weights in ("pissa", "olora")
            or config.modules_to_save
            or lora.modules_to_save_copies(inner, name)
        ):
            return None
        targets, shapes, dtypes = [], {}, set()
        for target, layer in lora.lora_layers(inner):
            if name not in layer.r:
                continue
            if layer.is_embedding:
                return None
            targets.append((target, layer.r[name], layer.lora_alpha[name]))
            for key, factor in zip(("lora_A", "lora_B"), layer.factors(name)):
                shapes[f"base_model.model.{target}.{key}.weight"] = tuple(factor.shape)
                dtypes.add(factor.dtype)
        on_disk = {k: s for k, (_, s) in read_header(os.path.join(path, WEIGHTS_NAME)).items()}
        if not targets or on_disk != shapes or len(dtypes) != 1:
            return None
        return _Layout(targets, shapes, dtypes == {torch.float32})

    def _load_in_full(self, name: str, path: str) -> None:
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        except Exception as e:  # the files passed the cheap checks but not the loader: undo what it added
            if isinstance(self.model, PeftModel) and name in self.model.peft_config:
                self.model.delete_adapter(name)
            raise EngineError(
                Reason.BAD_REQUEST, f"could not load adapter {name!r}: {type(e).__name__}: {e}", "path"
            ) from None
        finally:
            self.model.eval()  # a loader may leave dropout on; serving is inference, always

    def _delete(self, name: str) -> None:
        with self._cv:
            pending = [r for r in [*self._rows, *self._waiting] if r.adapter == name]
        for req in pending:
            self._fail(req, EngineError(Reason.NOT_FOUND, f"adapter {name!r} was unloaded", "model"))
        if name in self._loaded:
            self._evict(name)
            self.stats["adapter_evictions"] -= 1  # a deletion, not an eviction
        del self.adapter_paths[name]
        self._stamps.pop(name, None)
        self._layout_of.pop(name, None)
        self.stats["loaded_adapters"] = len(self._loaded)
        log.info("deleted adapter %s (%d requests in flight ended)", name, len(pending))


def adapter_path_under(root: str, path: str) -> str:
    """The real path of adapter directory `path` (relative to `root`, or absolute), refused with FORBIDDEN unless it
    and every file in it resolve inside `root`: a symlinked weights file must not read from elsewhere."""
    root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, path))  # realpath: '..' and symlinks cannot leave the root
    inside = [real]
    if os.path.isdir(real):
        inside += [os.path.realpath(entry.path) for entry in os.scandir(real)]
    for p in inside:
        if os.path.commonpath([root, p]) != root:
            raise EngineError(
                Reason.FORBIDDEN,
                f"adapter path {clip(repr(path))} is or holds a file outside the adapter directory",
                "path",
            )
    return real


def _check_adapter_files(path: str) -> None:
    """Cheap checks before the loader runs: a LoRA config whose numbers are numbers, and safetensors weights."""
    config = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config):
        raise EngineError(
            Reason.BAD_REQUEST, f"{clip(path, 200)} is not an adapter directory (no {CONFIG_NAME})", "path"
        )
    try:
        with open(config, encoding="utf-8") as f:
            cfg = json.load(f)
    except (ValueError, OSError) as e:
        raise EngineError(Reason.BAD_REQUEST, f"{CONFIG_NAME} is not readable JSON: {e}", "path") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        kind = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise EngineError(Reason.BAD_REQUEST, f"serve runs LoRA adapters, found {clip(repr(kind))}", "path")
    for key, types in (("r", (int,)), ("lora_alpha", (int, float))):
        value = cfg.get(key, 8)
        if type(value) not in types or not math.isfinite(value) or value <= 0:
            raise EngineError(
                Reason.BAD_REQUEST, f"{CONFIG_NAME}: {key} must be a positive number, found {clip(repr(value))}", "path"
            )
    if not os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        found = f"only {BIN_NAME}, which" if os.path.isfile(os.path.join(path, BIN_NAME)) else "no weights, and"
        raise EngineError(
            Reason.BAD_REQUEST,
            f"the adapter has {found} serve does not load: it loads {WEIGHTS_NAME} only (a .bin is a pickle)",
            "path",
        )


def _signature(path: str) -> str | None:
    """Adapter configs that load along one layout: the config without the fields that do not change where the
    tensors go or what they compute in eval mode (a config that cannot be read gets none)."""
    try:
        with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    return json.dumps(
        {k: v for k, v in cfg.items() if k not in ("base_model_name_or_path", "revision", "inference_mode")},
        sort_keys=True,
    )


def _stamp(path: str) -> tuple:
    """(inode, size, mtime) of an adapter's config and weights: equal stamps, same files (as far as a stat can tell)."""
    out = []
    for file in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            st = os.stat(os.path.join(path, file))
        except OSError:
            out.append(None)
        else:
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escapes decode to lone surrogates, which no tokenizer takes
        raise EngineError(
            Reason.BAD_REQUEST, f"{param} is not valid Unicode: {e.reason} at position {e.start}", param
        ) from None


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each batch × heads × positions × head_dim; iterating a cache yields them."""
    return [(layer[0], layer[1]) for layer in cache]


def _cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def _notify(req: Request) -> None:
    try:
        req.notify()
    except Exception:  # a listener's failure (its event loop closed, say) is not the request's or the batch's
        log.debug("notify failed", exc_info=True)
