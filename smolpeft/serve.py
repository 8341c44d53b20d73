"""Serve: the OpenAI-compatible HTTP API in front of an `Engine` (engine.py), and `serve` to run both.

This module is the thin web layer: it authenticates, bounds and parses bodies, runs the CPU work of a request
(JSON, tokenizing) off the event loop, and maps the engine's `Reason`s to HTTP status codes. Every error is an
OpenAI-style JSON body that quotes client input only clipped, and answers on a connection that stays usable.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator

from .engine import Engine, EngineError, Reason, Request, SamplingParams, adapter_path_under, clip

try:
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException
except ImportError as e:
    raise ImportError("smolpeft serve needs fastapi and uvicorn: pip install 'smolpeft[serve]'") from e

__all__ = ["Engine", "Request", "SamplingParams", "create_app", "serve", "resolve_api_key", "STATUS"]

log = logging.getLogger("smolpeft.serve")

MAX_BODY_BYTES = 4 * 2**20  # a full 128k-token prompt as text or as token ids fits
MAX_WAITING = 256

# The engine's reasons as (HTTP status, OpenAI error code).
STATUS: dict[Reason, tuple[int, str | None]] = {
    Reason.BAD_REQUEST: (400, None),
    Reason.CONTEXT_LENGTH: (400, "context_length_exceeded"),
    Reason.FORBIDDEN: (403, "forbidden"),
    Reason.NOT_FOUND: (404, "model_not_found"),
    Reason.CONFLICT: (409, "conflict"),
    Reason.OVERLOADED: (429, "overloaded"),
    Reason.INTERNAL: (500, "internal_error"),
    Reason.UNAVAILABLE: (503, "unavailable"),
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    @classmethod
    def of(cls, e: EngineError) -> APIError:
        status, code = STATUS[e.reason]
        return cls(status, e.message, "server_error" if status >= 500 else "invalid_request_error", code, e.param)


def _error(status: int, message: str, type: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    body = {"message": clip(message, 1000), "type": type, "param": param and clip(param), "code": code}
    return JSONResponse({"error": body}, status_code=status)


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
_NEUTRAL = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logprobs": False,
    "top_logprobs": 0,
    "logit_bias": {},
    "echo": False,
    "best_of": 1,
    "suffix": "",
    "user": None,
}


def _check_extras(body: BaseModel) -> None:
    for key, value in (body.model_extra or {}).items():
        if key == "user" or (key in _NEUTRAL and value in (None, _NEUTRAL[key])):
            continue
        raise APIError(400, f"unsupported parameter {clip(repr(key))}={clip(repr(value))}", param=clip(key))


def _decode(raw: bytes, cls: type[BaseModel]) -> BaseModel:
    """The body as `cls`, or a 400 that names the first bad field. CPU work: run it off the event loop."""

    def no_constant(name: str):  # json accepts NaN and Infinity, which JSON does not have
        raise ValueError(f"{name} is not a JSON number")

    try:
        data = json.loads(raw, parse_constant=no_constant)
    except ValueError as e:  # also invalid UTF-8
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


def _guarded(route):
    """Engine refusals become their status; anything unexpected a 500. Both are handled responses, so the server
    keeps the client's connection (an exception that escapes to Starlette's last handler closes it)."""

    @functools.wraps(route)
    async def wrapper(*args, **kwargs):
        try:
            return await route(*args, **kwargs)
        except (APIError, HTTPException):
            raise
        except EngineError as e:
            raise APIError.of(e) from None
        except Exception as e:
            log.exception("request failed")
            raise APIError(500, f"{type(e).__name__}: {e}", "server_error", "internal_error") from None

    return wrapper


def create_app(
    engine: Engine, api_key: str | None = None, adapter_dir: str | None = None, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """The routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/adapters, /health. With an `api_key`, every
    route but /health needs it, and /health tells only status and counters. No docs or OpenAPI routes."""
    app = FastAPI(title="smolpeft serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error(e.status, e.message, e.type, e.code, e.param)

    @app.exception_handler(EngineError)
    async def _engine_error(_, e: EngineError):
        return await _api_error(_, APIError.of(e))

    @app.exception_handler(HTTPException)
    async def _http_error(request: HTTPRequest, e: HTTPException):  # no route, or a wrong method
        if not key_ok(request):
            return _error(401, "missing or wrong API key", "invalid_request_error", "invalid_api_key")
        return _error(
            e.status_code, str(e.detail), "invalid_request_error", "not_found" if e.status_code == 404 else None
        )

    @app.exception_handler(Exception)
    async def _internal_error(_, e: Exception):
        log.exception("request failed")
        return _error(500, f"{type(e).__name__}: {e}", "server_error", "internal_error")

    def key_ok(request: HTTPRequest) -> bool:
        if api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())

    def check_key(request: HTTPRequest) -> None:
        if not key_ok(request):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    async def parse(request: HTTPRequest, cls: type[BaseModel]):
        """Authenticate, then read at most max_body_bytes: a client cannot make the server hold or parse more."""
        check_key(request)
        too_large = APIError(
            413, f"the request body is over {max_body_bytes} bytes (--max-body-bytes)", code="request_too_large"
        )
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body_bytes:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_large
            chunks.append(chunk)
        return await run_in_threadpool(_decode, b"".join(chunks), cls)

    def sampling(body: _Body, max_tokens: int | None) -> SamplingParams:
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n}: this server returns one choice per request; send n requests", param="n")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        temperature = 1.0 if body.temperature is None else body.temperature
        return SamplingParams(max_tokens, temperature, 1.0 if body.top_p is None else body.top_p, stop, body.seed)

    def prompt_ids(prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request, got {len(prompt)}; send one request each", param="prompt")
            prompt = prompt[0]
        return engine.encode(prompt) if isinstance(prompt, str) else list(prompt)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return _error(503, "the decode loop is not running", "server_error")
        if api_key is not None:  # answered without the key: nothing about the model, its paths or adapters
            return {"status": "ok", "stats": dict(engine.stats)}
        return {"status": "ok", "model": engine.name, "adapters": engine.adapters, "stats": dict(engine.stats)}

    @app.get("/v1/models")
    @_guarded
    async def models(request: HTTPRequest):
        check_key(request)
        base = {
            "id": engine.name,
            "object": "model",
            "created": created,
            "owned_by": "smolpeft",
            "root": engine.name,
            "parent": None,
        }
        data = [base] + [
            base | {"id": name, "root": path, "parent": engine.name}
            for name, path in dict(engine.adapter_paths).items()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    @_guarded
    async def completions(request: HTTPRequest):
        body = await parse(request, CompletionBody)
        adapter = engine.resolve(body.model)
        params = sampling(body, body.max_tokens or 16)  # 16: OpenAI's default
        return await respond(
            request, body, "text_completion", Request([], adapter, params), lambda: prompt_ids(body.prompt)
        )

    @app.post("/v1/chat/completions")
    @_guarded
    async def chat(request: HTTPRequest):
        body = await parse(request, ChatBody)
        adapter = engine.resolve(body.model)
        params = sampling(body, body.max_completion_tokens or body.max_tokens)  # None: up to the context
        messages = []
        for m in body.messages:
            parts = m.content if isinstance(m.content, list) else [ContentPart(type="text", text=m.content or "")]
            if any(p.type != "text" for p in parts):
                raise APIError(400, "only text content parts are supported", param="messages")
            messages.append({"role": m.role, "content": "".join(p.text or "" for p in parts)})
        return await respond(
            request, body, "chat.completion", Request([], adapter, params), lambda: engine.encode_chat(messages)
        )

    async def respond(request: HTTPRequest, body: _Body, kind: str, req: Request, tokenize):
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        req.notify = lambda: loop.call_soon_threadsafe(event.set)

        def submit() -> None:  # tokenizing and checking cost CPU time in proportion to the prompt: not on the loop
            req.prompt_ids = tokenize()
            engine.submit(req)

        await run_in_threadpool(submit)
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": kind, "created": int(time.time()), "model": body.model}
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
            raise APIError.of(req.error)
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
                e = APIError.of(req.error)
                yield _sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
            else:
                yield chunk(None, req.finish_reason)
                if usage:
                    yield _sse(head | {"choices": [], "usage": _usage(req)})
            yield "data: [DONE]\n\n"
        finally:  # also reached when the server cancels this generator because the client disconnected
            if req.finish_reason is None:
                engine.cancel(req)

    @app.post("/v1/adapters")
    @_guarded
    async def load_adapter(request: HTTPRequest):
        body = await parse(request, AdapterBody)
        if adapter_dir is None:
            raise APIError(403, "hot-loading is off: start the server with --adapter-dir DIR", code="forbidden")
        path = await run_in_threadpool(adapter_path_under, adapter_dir, body.path)
        await run_in_threadpool(engine.load_adapter, body.name, path)
        return {
            "id": body.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "smolpeft",
            "root": path,
            "parent": engine.name,
        }

    @app.delete("/v1/adapters/{name:path}")
    @_guarded
    async def delete_adapter(request: HTTPRequest, name: str):
        check_key(request)
        await run_in_threadpool(engine.delete_adapter, name)
        return {"id": name, "object": "model", "deleted": True}

    return app


def _usage(req: Request) -> dict:
    n_in, n_out = len(req.prompt_ids), len(req.out_ids)
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def resolve_api_key(
    api_key: str | None = None, api_key_file: str | None = None, environ: dict[str, str] | None = None
) -> str | None:
    """The key from --api-key, else from --api-key-file, else from $SMOLPEFT_API_KEY; None: no key. A file or the
    environment keeps the key out of argv, which any local user can read in the process list."""
    if api_key and api_key_file:
        raise ValueError("give --api-key or --api-key-file, not both")
    if api_key_file:
        with open(api_key_file, encoding="utf-8") as f:
            key = f.read().strip()
        if not key:
            raise ValueError(f"the API key file {api_key_file} is empty")
        return key
    return api_key or (os.environ if environ is None else environ).get("SMOLPEFT_API_KEY") or None


def serve(
    model: str,
    adapters: dict[str, str] | None = None,
    adapter_dir: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    quantize: str | None = None,
    api_key_file: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_prompt_tokens: int | None = None,
    max_waiting: int = MAX_WAITING,
    max_loaded_adapters: int | None = None,
) -> None:
    """Load the engine and run the API with uvicorn until interrupted. `max_loaded_adapters` bounds the adapters in
    the model at once (the others load from their files on demand, least recently used out); None: all of them."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    api_key = resolve_api_key(api_key, api_key_file)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach the port can use and change it", host)
    engine = Engine.load(
        model,
        adapters,
        quantize=quantize,
        max_batch=max_batch,
        max_waiting=max_waiting,
        max_prompt_tokens=max_prompt_tokens,
        max_loaded_adapters=max_loaded_adapters,
    )
    engine.start()
    log.info("serving %s with adapters %s on http://%s:%d/v1", model, engine.adapters or "(none)", host, port)
    try:
        app = create_app(engine, api_key=api_key, adapter_dir=adapter_dir, max_body_bytes=max_body_bytes)
        uvicorn.run(app, host=host, port=port)
    finally:
        engine.stop()
