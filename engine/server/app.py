"""The FastAPI app: OpenAI-compatible routes over a ``TransformersModelManager``.

Every generation goes through ``manager.astream``, so concurrent HTTP requests are batched by the model's
scheduler exactly like in-process ones. A streaming response is produced by an async generator that pulls
deltas from ``astream``: when the client disconnects, Starlette cancels it, ``astream`` closes and the
scheduler drops the row at its next step. Errors map to OpenAI's ``{"error": {...}}`` shape (errors.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hmac
import json
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import OverloadedError, StructuredOutputError, TTAEngineError
from ..generator import GenerationState
from ..tool_calls import ToolCallStream, ended_with_calls, parse_tool_calls
from .errors import ShuttingDown, error_body, error_response
from .hosts import LOOPBACK, HostPolicy
from .metrics import ServerMetrics
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, InvalidRequest, ModelCard

_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics"}


class Lifecycle:
    """Drain on shutdown: new requests get 503, running ones may finish for ``grace_s`` seconds, then the
    rest are stopped (streams end with an error event, non-streaming requests answer 503)."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.draining = False
        self.handles: set[_Handle] = set()

    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        asyncio.get_running_loop().call_later(self.grace_s, self.stop_all)

    def stop_all(self) -> None:
        for handle in list(self.handles):
            handle.stop()


class _Handle:
    """Pulls deltas from one ``astream`` and lets the drain stop it while it waits for the next token."""

    def __init__(self, lifecycle: Lifecycle, agen):
        self.lifecycle, self.agen = lifecycle, agen
        self.task: asyncio.Task | None = None
        self.waiting = self.stopped = False
        lifecycle.handles.add(self)

    def stop(self) -> None:
        self.stopped = True
        if self.waiting and self.task is not None:  # suspended inside astream: interrupt it there
            self.task.cancel()

    async def next(self) -> str:
        if self.stopped:
            raise ShuttingDown()
        self.task, self.waiting = asyncio.current_task(), True
        try:
            return await self.agen.__anext__()
        except asyncio.CancelledError:
            if self.stopped and self.task.uncancel() == 0:  # our own cancel, not the client's
                raise ShuttingDown() from None
            raise
        finally:
            self.waiting = False

    async def close(self) -> None:
        self.lifecycle.handles.discard(self)
        await self.agen.aclose()  # a request still decoding is cancelled: its row goes at the next step


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class _Guard:
    """ASGI middleware: request metrics, Host / Origin check (hosts.py), API key, body size limit, 503
    while draining."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, lifecycle: Lifecycle,
                 metrics: ServerMetrics, hosts: HostPolicy):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.lifecycle, self.metrics, self.hosts = lifecycle, metrics, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in _ROUTES else "other"
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            reject = self._reject(scope, path)
            if reject is None:
                receive, reject = await self._read_body(scope, receive)
            if reject is not None:
                return await reject(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request(route, status)

    def _reject(self, scope, path: str):
        headers = dict(scope["headers"])
        host, origin = headers.get(b"host"), headers.get(b"origin")
        host = None if host is None else host.decode("latin-1")
        if not self.hosts.host_ok(host):
            return error_response(403, f"Host {host!r} is not served here (DNS rebinding protection); start the "
                                  "server with --allowed-hosts naming it", "invalid_request_error",
                                  code="host_not_allowed")
        if not self.hosts.origin_ok(None if origin is None else origin.decode("latin-1"), host):
            return error_response(403, f"requests from origin {origin.decode('latin-1')!r} are not allowed; "
                                  "start the server with --allowed-origins naming it", "invalid_request_error",
                                  code="origin_not_allowed")
        if path == "/health":
            return None
        if self.lifecycle.draining:
            return error_response(503, "the server is shutting down; retry on another instance",
                                  "server_error", code="server_shutting_down", headers={"Connection": "close"})
        if self.api_key is not None:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return error_response(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                      "invalid_request_error", code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _read_body(self, scope, receive):
        """Read the whole body (at most max_body_bytes) before the app sees it; replay it, then pass
        further receive() calls (the disconnect) through."""
        too_large = error_response(413, f"request body larger than {self.max_body_bytes} bytes",
                                   "invalid_request_error", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return receive, too_large
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return receive, too_large
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return replay, None


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on the texts of one /v1/embeddings request


def _finish(state: GenerationState, called: bool) -> str | None:
    """OpenAI's finish reason: "tool_calls" when the reply ended (not cut off by max_tokens) with calls."""
    return "tool_calls" if ended_with_calls(state.finish_reason, called) else state.finish_reason


def _call_item(call) -> dict:
    """A parsed ToolCall as an OpenAI ``tool_calls`` item."""
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


class ClientGone(Exception):
    """The client disconnected before its response was sent."""


async def _disconnected(receive) -> None:
    """Returns once the client has gone (the body was read already: what comes next is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, aw):
    """Await ``aw``, cancelling it (the engine request with it) if the client disconnects first."""
    work, gone = asyncio.ensure_future(aw), asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        gone.cancel()
        raise
    if work in done:
        gone.cancel()
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    raise ClientGone()


def create_app(manager, *, api_key: str | None = None, max_body_bytes: int = 4 << 20,
               shutdown_grace_s: float = 30.0, preload: tuple[str, ...] = (), close_manager: bool = True,
               allowed_hosts: tuple[str, ...] = LOOPBACK, allowed_origins: tuple[str, ...] = (),
               docs: bool = False, max_embedding_requests: int = 64) -> FastAPI:
    """The ASGI app. ``api_key``: required as ``Authorization: Bearer`` on every route but /health.
    ``preload``: models loaded at startup. ``close_manager``: ``manager.close()`` at shutdown.
    ``allowed_hosts`` / ``allowed_origins``: the Host and Origin headers answered (hosts.py; "*": any);
    listed origins also get CORS. ``docs``: serve /docs, /redoc and /openapi.json.
    ``max_embedding_requests``: /v1/embeddings requests running or waiting before 429."""
    lifecycle = Lifecycle(shutdown_grace_s)
    metrics = ServerMetrics(manager)
    embedding_slots = max_embedding_requests

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for name in preload:
            await asyncio.to_thread(manager.load_model, name)
        # what exists now lives as long as the server: out of the cyclic GC's way, so that a full
        # collection scans only request garbage (as vLLM does after start-up). Measured in the test
        # process (torch and the exporters loaded): gen-2 collections of 0.25 s, each one a pause in
        # every stream.
        gc.collect()
        gc.freeze()
        yield
        lifecycle.begin_drain()
        lifecycle.stop_all()
        if close_manager:
            await asyncio.to_thread(manager.close)

    urls = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="tta-engine", lifespan=lifespan, **urls)
    app.state.manager, app.state.lifecycle, app.state.metrics = manager, lifecycle, metrics
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, lifecycle=lifecycle, metrics=metrics,
                       hosts=HostPolicy(allowed_hosts, allowed_origins))
    if allowed_origins:  # outermost: answers CORS preflights itself, adds the headers to responses
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])

    @app.exception_handler(TTAEngineError)
    async def _engine_error(request: Request, exc: TTAEngineError):
        return error_body(exc)

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception):  # a bug: 500 in OpenAI's shape (and logged)
        return error_body(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_body(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_body(exc)

    async def generate(request: Request, kind: str, body, prompt) -> Response:
        kwargs = body.sampling_kwargs()
        name = manager.resolve_name(body.model)
        created, state = int(time.time()), GenerationState(0)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def choice(delta: str | None, finish: str | None, first: bool = False) -> dict:
            if kind == "chat":
                d = {} if delta is None else {"content": delta}
                if first:
                    d["role"] = "assistant"
                return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}

        def usage() -> dict:
            c = state.completion()
            metrics.completion(name, c)
            return dict(c["usage"])

        tools = kwargs.get("tools")
        schemas = tools.schemas() if tools is not None else None

        def message(text: str) -> tuple[dict, str | None]:
            """The assistant message of a finished reply, and its finish reason."""
            reply = None
            if schemas is not None:
                with contextlib.suppress(StructuredOutputError):  # cut off inside a call: the text as it is
                    reply = parse_tool_calls(text, schemas)
            if reply is None or not reply.calls:
                return {"role": "assistant", "content": text}, state.finish_reason
            # complete calls are returned; a call cut off by max_tokens is dropped (finish_reason "length")
            return ({"role": "assistant", "content": reply.text or None,
                     "tool_calls": [_call_item(c) for c in reply.calls]}, _finish(state, True))

        handle = _Handle(lifecycle, manager.astream(prompt, name, state=state, **kwargs))
        if not body.stream:
            async def collect() -> str:
                parts = []
                try:
                    while True:
                        parts.append(await handle.next())
                except StopAsyncIteration:
                    return "".join(parts)
                finally:
                    await handle.close()

            text = await _unless_gone(request, collect())
            u = usage()
            msg, finish = message(text)
            ch = ({"index": 0, "message": msg, "logprobs": None, "finish_reason": finish} if kind == "chat" else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": state.finish_reason})
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": body.model,
                                 "choices": [ch], "usage": u})

        # streaming: wait for the first delta before the headers, so that errors before it (unknown model,
        # context length, full queue, ...) still get their HTTP status
        async def first_delta() -> str | None:
            try:
                return await handle.next()
            except StopAsyncIteration:
                return None

        try:
            first = await _unless_gone(request, first_delta())
        except BaseException:
            await handle.close()
            raise
        chunk_obj = obj + ".chunk" if kind == "chat" else obj

        def chunk(choices: list, **extra) -> bytes:
            return _sse({"id": rid, "object": chunk_obj, "created": created, "model": body.model,
                         "choices": choices, **extra})

        splitter = ToolCallStream(schemas) if schemas is not None else None

        def deltas(delta: str):
            """The chunks of one text delta: as is, or (with tools) prose deltas and whole tool calls."""
            if splitter is None:
                yield chunk([choice(delta, None)])
                return
            for kind_, value in splitter.feed(delta):
                if kind_ == "text":
                    yield chunk([choice(value, None)])
                else:
                    item = {"index": len(splitter.calls) - 1, **_call_item(value)}
                    yield chunk([{"index": 0, "delta": {"tool_calls": [item]}, "logprobs": None,
                                  "finish_reason": None}])

        def closing() -> tuple[list[bytes], str | None]:
            if splitter is None:
                return [], state.finish_reason
            try:
                rest = splitter.finish()
            except StructuredOutputError:  # cut off inside a call: dropped, as in the non-streaming reply
                rest = []
            return [chunk([choice(v, None)]) for _, v in rest], _finish(state, bool(splitter.calls))

        async def events():
            try:
                if kind == "chat":
                    yield chunk([choice("", None, first=True)])
                if first is not None:
                    for c in deltas(first):
                        yield c
                    while True:
                        try:
                            delta = await handle.next()
                        except StopAsyncIteration:
                            break
                        for c in deltas(delta):
                            yield c
                tail, finish = closing()
                for c in tail:
                    yield c
                u = usage()
                yield chunk([choice(None, finish)])
                if body.include_usage:
                    yield chunk([], usage=u)
            except Exception as exc:  # noqa: BLE001 - ShuttingDown or a failure mid-stream: the last event
                yield _sse(json.loads(error_body(exc).body))
            finally:
                await handle.close()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):  # nobody reads it: the status is for the metrics
        return Response(status_code=499)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        return await generate(request, "chat", body, body.chat_messages())

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await generate(request, "completion", body, body.prompt_text())

    @app.post("/v1/embeddings")
    async def embeddings(request: Request, body: EmbeddingRequest):
        nonlocal embedding_slots
        texts = body.texts()
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequest(f"input has {len(texts)} texts; at most {MAX_EMBEDDING_INPUTS} per request: "
                                 "split it into several requests", "input")
        name = manager.resolve_name(body.model)
        cfg = manager.model_configs[name]
        if not cfg.is_embedding:
            raise InvalidRequest(f"model {name!r} is a {cfg.model_type} model, not an embedding model", "model")
        if body.dimensions is not None and body.dimensions != cfg.embedding_dimension:
            raise InvalidRequest(f"dimensions={body.dimensions}: model {name!r} only produces "
                                 f"{cfg.embedding_dimension}-dimensional embeddings", "dimensions")

        if embedding_slots <= 0:
            raise OverloadedError(f"{max_embedding_requests} embedding requests are running or waiting "
                                  "(max_embedding_requests); retry later")
        embedding_slots -= 1
        try:
            vecs, n_tokens = await asyncio.to_thread(manager.embed_counted, texts, name, truncate=body.truncate)
        finally:
            embedding_slots += 1
        vecs = np.asarray(vecs, dtype=np.float32)
        if body.encoding_format == "base64":
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vecs]
        else:
            data = vecs.tolist()
        return {"object": "list", "model": body.model,
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    def card(name: str, loaded: set[str]) -> dict:
        cfg = manager.model_configs[name]
        return ModelCard(id=name, type=cfg.model_type, loaded=name in loaded).model_dump()

    @app.get("/v1/models")
    async def models():
        loaded = set(manager.loaded_models)
        return {"object": "list", "data": [card(n, loaded) for n in manager.model_configs]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        return card(manager.resolve_name(model), set(manager.loaded_models))

    @app.get("/health")
    async def health():
        if lifecycle.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return {"status": "ok", "loaded_models": manager.loaded_models}

    @app.get("/metrics")
    async def prometheus():
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    return app
