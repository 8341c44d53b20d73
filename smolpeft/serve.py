"""Serve: one base model and many LoRA adapters behind an OpenAI-compatible API, decoded in one shared batch.

The `Engine` owns the model and runs a decode loop on its own thread. Between steps it admits waiting requests
(each prefilled alone, with its own adapter) and lets finished or cancelled ones leave; each step is ONE forward
over every active request with one adapter per row (`adapter_names=[...]`), so requests for different adapters
share the pass. The batch keeps one left-padded KV cache, rebuilt only when rows join or leave; a 2D attention
mask and per-row position ids make each row compute what it would compute alone.
`create_app` puts the FastAPI routes of the OpenAI schema in front of an engine; `serve` runs both.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import inspect
import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import load_config
from .data import _chat
from .lora import BASE
from .model import PeftModel

try:
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException
except ImportError as e:
    raise ImportError("smolpeft serve needs fastapi and uvicorn: pip install 'smolpeft[serve]'") from e

log = logging.getLogger("smolpeft.serve")


# --- the engine ----------------------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    max_tokens: int
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
    error: tuple[int, str] | None = None  # (HTTP status, message) when finish_reason == "error"
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None


class Engine:
    """A causal LM (a PeftModel once it has adapters) and the decode loop that serves it."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch = max_batch
        base = model.base_model if isinstance(model, PeftModel) else model
        text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        kinds = set(getattr(text_config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise ValueError(f"serve batches full-attention models only; {name} has layer types {sorted(kinds)}")
        self.context = int(getattr(text_config, "max_position_embeddings", None) or tokenizer.model_max_length)
        self.vocab_size = int(text_config.vocab_size)
        eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.device = next(model.parameters()).device
        params = inspect.signature(base.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
        self._keep_arg = "logits_to_keep" if "logits_to_keep" in params else None
        self.adapter_paths: dict[str, str] = dict.fromkeys(getattr(model, "peft_config", {}), "")
        self.stats = {"steps": 0, "mixed_steps": 0, "prefills": 0, "tokens": 0, "max_rows": 0, "cancelled": 0,
                      "errors": 0, "active": 0, "waiting": 0}
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._calls: list[tuple[Callable, Future]] = []
        self._rows: list[Request] = []  # the batch, in the row order of the cache
        self._cache = None
        self._mask: torch.Tensor | None = None  # rows × cached positions: 0 on left padding
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def load(cls, model: str, adapters: dict[str, str] | None = None, quantize: str | None = None,
             max_batch: int = 8, device: str | None = None) -> Engine:
        """The base from a directory or Hub id (4-bit NF4 with quantize="nf4"), with the named adapters loaded.
        `device` defaults to CUDA when there is one."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = AutoTokenizer.from_pretrained(model)
        if quantize == "nf4":
            from .qlora import bnb_config

            base = AutoModelForCausalLM.from_pretrained(model, quantization_config=bnb_config(), device_map={"": device})
        elif quantize is None:
            base = AutoModelForCausalLM.from_pretrained(model).to(device)
        else:
            raise ValueError(f"quantize={quantize!r}; expected 'nf4' or None")
        engine = cls(base, tokenizer, model, max_batch)
        for name, path in (adapters or {}).items():
            engine.load_adapter(name, path)
        return engine

    @property
    def adapters(self) -> list[str]:
        return list(self.adapter_paths)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

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
            self._finish(req, "error", error=(503, "the server is shutting down"))
        self._rows, self._waiting, self._cache, self._mask = [], collections.deque(), None, None

    def submit(self, req: Request) -> Request:
        if req.params.temperature > 0:
            seed = req.params.seed if req.params.seed is not None else random.getrandbits(63)
            req.generator = torch.Generator().manual_seed(seed)
        with self._cv:
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
        self._call(lambda: self._load(name, path))

    def delete_adapter(self, name: str) -> None:
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
                while self._waiting and len(self._rows) + len(new) < self.max_batch:
                    req = self._waiting.popleft()
                    if req.cancelled:
                        self._finish(req, "cancelled")
                    elif req.adapter != BASE and req.adapter not in self.adapter_paths:
                        self._finish(req, "error", error=(404, f"adapter {req.adapter!r} was unloaded"))
                    else:
                        new.append(req)
            try:
                self._leave()
                self._join(new)
                if self._rows:
                    self._step()
                    self._leave()  # free finished rows now, not at the next request
            except Exception as e:  # fail this batch, keep serving
                log.exception("decode step failed; failing %d requests", len(self._rows) + len(new))
                self.stats["errors"] += 1
                for req in [*self._rows, *new]:
                    self._finish(req, "error", error=(500, f"generation failed: {type(e).__name__}: {e}"))
                self._rows, self._cache, self._mask = [], None, None
            self.stats["active"], self.stats["waiting"] = len(self._rows), len(self._waiting)

    def _forward(self, ids: torch.Tensor, names: list[str], cache, **kw):
        if isinstance(self.model, PeftModel):
            kw["adapter_names"] = names  # one adapter per row; BASE rows get none
        return self.model(input_ids=ids, use_cache=True, **{self._cache_arg: cache}, **kw)

    @torch.inference_mode()
    def _join(self, new: list[Request]) -> None:
        """Prefill each new request alone, then left-pad its cache and the batch's to one length and stack them."""
        from transformers import DynamicCache

        parts = []
        for req in new:
            cache = DynamicCache()
            ids = torch.tensor([req.prompt_ids], device=self.device)
            out = self._forward(ids, [req.adapter], cache, **({self._keep_arg: 1} if self._keep_arg else {}))
            self.stats["prefills"] += 1
            self._append(req, self._sample(out.logits[:, -1], [req])[0])
            if req.finish_reason is None:  # a request can end on its first token
                parts.append((_layers(cache), torch.ones(1, len(req.prompt_ids), dtype=torch.long, device=self.device)))
        if not parts:
            return
        if self._rows:
            parts.insert(0, (_layers(self._cache), self._mask))
        self._rows += [req for req in new if req.finish_reason is None]
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
        for req, token in zip(rows, self._sample(out.logits[:, -1], rows)):
            self._append(req, token)
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        mix = collections.Counter(names)
        if len(mix) > 1:
            self.stats["mixed_steps"] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("step %d: %d rows, adapters %s", self.stats["steps"], len(rows), dict(mix))

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        logits = logits.float()
        tokens = logits.argmax(-1).tolist()
        for i, req in enumerate(reqs):
            p = req.params
            if p.temperature == 0:
                continue
            probs = torch.softmax(logits[i] / p.temperature, -1).cpu()
            if p.top_p < 1:  # nucleus: the most likely tokens until their mass reaches top_p
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < p.top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            tokens[i] = int(torch.multinomial(probs, 1, generator=req.generator))
        return tokens

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

    def _finish(self, req: Request, reason: str, text: str | None = None, error: tuple[int, str] | None = None) -> None:
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
        config = load_config(path)
        if config.peft_type.value != "LORA":
            raise ValueError(f"{path}: serve runs LoRA adapters, found {config.peft_type.value}")
        if config.base_model_name_or_path and config.base_model_name_or_path != self.name:
            log.info("adapter %s was trained on %s; serving it on %s", name, config.base_model_name_or_path, self.name)
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        self.adapter_paths[name] = path
        log.info("loaded adapter %s from %s", name, path)

    def _delete(self, name: str) -> None:
        with self._cv:
            pending = [r for r in [*self._rows, *self._waiting] if r.adapter == name]
        for req in pending:
            self._finish(req, "error", error=(404, f"adapter {name!r} was unloaded"))
        self.model.delete_adapter(name)
        del self.adapter_paths[name]
        log.info("deleted adapter %s (%d requests in flight ended)", name, len(pending))


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
    except RuntimeError:  # the client's event loop has closed; nobody is listening any more
        pass


# --- the OpenAI-compatible API ---------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


def _error(status: int, message: str, type: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are refused by _check_extras, with their names

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class CompletionBody(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    role: str
    content: str | list[ContentPart] | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class AdapterBody(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=r"^\S+$")
    path: str = Field(min_length=1)


# Fields of the OpenAI schema that this server does not implement: accepted at their no-op value, refused otherwise.
_NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "top_logprobs": 0, "logit_bias": {},
            "echo": False, "best_of": 1, "suffix": "", "user": None}


def _check_extras(body: BaseModel) -> None:
    for key, value in (body.model_extra or {}).items():
        if key == "user" or (key in _NEUTRAL and value in (None, _NEUTRAL[key])):
            continue
        raise APIError(400, f"unsupported parameter {key!r}={value!r}", param=key)


def create_app(engine: Engine, api_key: str | None = None, adapter_dir: str | None = None) -> FastAPI:
    """The routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/adapters, /health."""
    app = FastAPI(title="smolpeft serve", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error(e.status, e.message, e.type, e.code, e.param)

    @app.exception_handler(HTTPException)
    async def _http_error(_, e: HTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error", "not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _internal_error(_, e: Exception):
        log.exception("request failed")
        return _error(500, f"{type(e).__name__}: {e}", "server_error", "internal_error")

    def check_key(request: HTTPRequest) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    async def parse(request: HTTPRequest, cls: type[BaseModel]):
        check_key(request)
        try:
            data = json.loads(await request.body())
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, found {type(data).__name__}")
        try:
            body = cls.model_validate(data)
        except ValidationError as e:
            errs = e.errors()
            where = [".".join(str(p) for p in err["loc"]) for err in errs]
            raise APIError(400, "; ".join(f"{w}: {err['msg']}" for w, err in zip(where, errs)), param=where[0]) from None
        _check_extras(body)
        return body

    def adapter_for(model: str) -> str:
        if model == engine.name:
            return BASE
        if model in engine.adapter_paths:
            return model
        served = ", ".join([engine.name, *engine.adapters])
        raise APIError(404, f"model {model!r} does not exist; this server has: {served}", code="model_not_found",
                       param="model")

    def sampling(body: _Body, n_prompt: int, max_tokens: int | None) -> SamplingParams:
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n}: this server returns one choice per request; send n requests", param="n")
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if n_prompt >= engine.context:
            raise APIError(400, f"the prompt has {n_prompt} tokens; this model's context is {engine.context} tokens",
                           code="context_length_exceeded")
        max_tokens = max_tokens or engine.context - n_prompt
        if n_prompt + max_tokens > engine.context:
            raise APIError(400, f"{n_prompt} prompt tokens + max_tokens {max_tokens} exceed this model's context of "
                                f"{engine.context} tokens", code="context_length_exceeded", param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or "" in stop:
            raise APIError(400, f"stop takes up to 4 non-empty strings, got {stop!r}", param="stop")
        temperature = 1.0 if body.temperature is None else body.temperature
        return SamplingParams(max_tokens, temperature, 1.0 if body.top_p is None else body.top_p, stop, body.seed)

    def prompt_ids(prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request, got {len(prompt)}; send one request each", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return engine.tokenizer(prompt)["input_ids"]
        bad = [t for t in prompt if not 0 <= t < engine.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary (0..{engine.vocab_size - 1})",
                           param="prompt")
        return list(prompt)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return _error(503, "the decode loop is not running", "server_error")
        return {"status": "ok", "model": engine.name, "adapters": engine.adapters, "stats": engine.stats}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        check_key(request)
        base = {"id": engine.name, "object": "model", "created": created, "owned_by": "smolpeft",
                "root": engine.name, "parent": None}
        data = [base] + [base | {"id": name, "root": path, "parent": engine.name}
                         for name, path in dict(engine.adapter_paths).items()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await parse(request, CompletionBody)
        adapter = adapter_for(body.model)
        ids = prompt_ids(body.prompt)
        req = Request(ids, adapter, sampling(body, len(ids), body.max_tokens or 16))  # 16: OpenAI's default
        return await respond(request, req, body, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await parse(request, ChatBody)
        adapter = adapter_for(body.model)
        messages = []
        for m in body.messages:
            parts = m.content if isinstance(m.content, list) else [ContentPart(type="text", text=m.content or "")]
            if any(p.type != "text" for p in parts):
                raise APIError(400, "only text content parts are supported", param="messages")
            messages.append({"role": m.role, "content": "".join(p.text or "" for p in parts)})
        try:
            ids = _chat(engine.tokenizer, messages, add_generation_prompt=True)
        except Exception as e:  # a template may refuse the conversation (roles out of order, say)
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        req = Request(ids, adapter, sampling(body, len(ids), body.max_completion_tokens or body.max_tokens))
        return await respond(request, req, body, "chat.completion")

    async def respond(request: HTTPRequest, req: Request, body: _Body, kind: str):
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        req.notify = lambda: loop.call_soon_threadsafe(event.set)
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": kind, "created": int(time.time()), "model": body.model}
        engine.submit(req)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(request, req, event, head, usage), media_type="text/event-stream")
        try:
            async for _ in follow(request, req, event):
                pass
        finally:
            if req.finish_reason is None:
                engine.cancel(req)
        if req.error:
            raise APIError(req.error[0], req.error[1], "server_error" if req.error[0] >= 500 else "invalid_request_error")
        if req.finish_reason is None:  # the client left; nobody reads this
            return _error(499, "client closed the request", "invalid_request_error")
        if kind == "chat.completion":
            choice = {"index": 0, "message": {"role": "assistant", "content": req.text}}
        else:
            choice = {"index": 0, "text": req.text}
        choice |= {"logprobs": None, "finish_reason": req.finish_reason}
        return head | {"choices": [choice], "usage": _usage(req)}

    async def follow(request: HTTPRequest, req: Request, event: asyncio.Event) -> AsyncIterator[str]:
        """New text as the engine writes it, until the request finishes or the client disconnects."""
        sent, checked = 0, time.monotonic()
        while True:
            try:
                await asyncio.wait_for(event.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            event.clear()
            finished = req.finish_reason is not None  # read before the text: the engine writes the text first
            text = req.text
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
            if finished:
                return
            if time.monotonic() - checked > 0.25:
                checked = time.monotonic()
                if await request.is_disconnected():
                    engine.cancel(req)
                    return

    async def stream(request: HTTPRequest, req: Request, event: asyncio.Event, head: dict, usage: bool):
        chat = head["object"] == "chat.completion"
        head = head | {"object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            return _sse(head | {"choices": [choice | {"logprobs": None, "finish_reason": finish}]})

        try:
            if chat:
                yield chunk("", role=True)
            async for piece in follow(request, req, event):
                yield chunk(piece)
            if req.finish_reason is None:
                return  # the client left
            if req.error:
                yield _sse({"error": {"message": req.error[1], "type": "server_error", "param": None, "code": None}})
            else:
                yield chunk(None, req.finish_reason)
                if usage:
                    yield _sse(head | {"choices": [], "usage": _usage(req)})
            yield "data: [DONE]\n\n"
        finally:  # also reached when the server cancels this generator because the client disconnected
            if req.finish_reason is None:
                engine.cancel(req)

    @app.post("/v1/adapters")
    async def load_adapter(request: HTTPRequest):
        body = await parse(request, AdapterBody)
        if adapter_dir is None:
            raise APIError(403, "hot-loading is off: start the server with --adapter-dir DIR", code="forbidden")
        root = os.path.realpath(adapter_dir)
        path = os.path.realpath(os.path.join(root, body.path))  # realpath: '..' and symlinks cannot leave the root
        if os.path.commonpath([root, path]) != root:
            raise APIError(403, f"adapter path {body.path!r} is outside the adapter directory", code="forbidden",
                           param="path")
        if body.name in (engine.name, BASE) or body.name in engine.adapter_paths:
            raise APIError(409, f"model {body.name!r} already exists; DELETE /v1/adapters/{body.name} first",
                           param="name")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise APIError(400, f"{body.path!r} is not an adapter directory (no adapter_config.json)", param="path")
        try:
            await run_in_threadpool(engine.load_adapter, body.name, path)
        except (ValueError, OSError, KeyError, RuntimeError) as e:
            raise APIError(400, f"could not load adapter {body.path!r}: {e}", param="path") from None
        return {"id": body.name, "object": "model", "created": int(time.time()), "owned_by": "smolpeft",
                "root": path, "parent": engine.name}

    @app.delete("/v1/adapters/{name:path}")
    async def delete_adapter(request: HTTPRequest, name: str):
        check_key(request)
        if name not in engine.adapter_paths:
            raise APIError(404, f"adapter {name!r} is not loaded; loaded: {', '.join(engine.adapters) or '(none)'}",
                           code="model_not_found")
        await run_in_threadpool(engine.delete_adapter, name)
        return {"id": name, "object": "model", "deleted": True}

    return app


def _usage(req: Request) -> dict:
    n_in, n_out = len(req.prompt_ids), len(req.out_ids)
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def serve(model: str, adapters: dict[str, str] | None = None, adapter_dir: str | None = None, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, max_batch: int = 8, quantize: str | None = None) -> None:
    """Load the engine and run the API with uvicorn until interrupted."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach the port can use and change it", host)
    engine = Engine.load(model, adapters, quantize=quantize, max_batch=max_batch)
    engine.start()
    log.info("serving %s with adapters %s on http://%s:%d/v1", model, engine.adapters or "(none)", host, port)
    try:
        uvicorn.run(create_app(engine, api_key=api_key, adapter_dir=adapter_dir), host=host, port=port)
    finally:
        engine.stop()
