"""ASGI middleware that runs inside Ray Serve's HTTP proxy, in front of the engine's replicas (ray_app.py).

Two jobs, both where the request and the response pass anyway (no extra hop):

* **the conversation key**: Ray Serve's proxy puts the ``X-Session-Id`` header into the request metadata
  that the request router sees (``RequestMetadata.session_id``), but it never reads the body before routing.
  This middleware does, for the generation routes: without the header it derives the key from the body's
  ``user`` field, else from a hash of the conversation's opening (the messages up to the first user
  message, at most ``PREFIX_CHARS`` characters; a completion prompt's first ``PREFIX_CHARS``), and sets the
  header. The router (Ray's
  ``ConsistentHashRouter``) then sends every request of one key to one replica: the one holding that
  conversation's KV prefix.
* **a replica that dies mid-stream**: the proxy then stops forwarding (the actor is gone, nothing more
  comes) and would leave the SSE body cut off. The middleware ends it like the server ends any stream that
  fails (app.py): an OpenAI error event (``error_body`` shape, 503 ``replica_died``), then ``[DONE]``.

Ray loads it through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=tta_engine.server.ray_proxy.middlewares``
in the environment of the proxy actors (ray_app.py sets it before it starts a local cluster; for a cluster
started with ``ray start``, set it there).
"""

from __future__ import annotations

import hashlib
import json

SESSION_HEADER = b"x-session-id"
PREFIX_CHARS = 512  # at most these prompt characters are hashed when a request carries no key
_GENERATION = ("/v1/chat/completions", "/v1/completions")
_MAX_PARSED = 4 << 20  # bodies above this are not parsed for a key (the app answers 413 anyway)


def _prompt_prefix(body: dict, n_chars: int) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):  # content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"{m.get('role')}:{content if isinstance(content, str) else ''}\n")
            if m.get("role") == "user" or sum(map(len, parts)) >= n_chars:
                break  # the opening (system prompt + first user turn) stays the same over the turns
        return "".join(parts)[:n_chars]
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and isinstance(prompt[0], str) else ""
    return prompt[:n_chars] if isinstance(prompt, str) else ""


def session_key(body: bytes | dict, headers: dict[str, str] | None = None, n_chars: int = PREFIX_CHARS) -> str:
    """The conversation key of a request: the ``X-Session-Id`` header, else ``user:<user field>``, else
    ``prefix:<sha1 of the opening>``: the messages up to the first user message (what every later turn
    repeats) or a completion prompt, cut at n_chars characters ("" for a body that is not a JSON object)."""
    for k, v in (headers or {}).items():
        if k.lower().replace("_", "-") == "x-session-id" and v:
            return v
    if isinstance(body, bytes | bytearray):
        try:
            body = json.loads(body) if len(body) <= _MAX_PARSED else None
        except (ValueError, UnicodeDecodeError):
            body = None
    if not isinstance(body, dict):
        return ""
    user = body.get("user")
    if isinstance(user, str) and user:
        return "user:" + user
    prefix = _prompt_prefix(body, n_chars)
    return "prefix:" + hashlib.sha1(prefix.encode("utf-8", "replace")).hexdigest()[:16] if prefix else ""


def _replica_died_event() -> bytes:
    from .app import _sse
    from .errors import error_response

    resp = error_response(503, "the replica serving this stream stopped (its process died); the reply is "
                          "incomplete: retry the request (Ray restarts the replica, another one answers now)",
                          "server_error", code="replica_died")
    return _sse(json.loads(resp.body)) + b"data: [DONE]\n\n"


class ProxyAffinity:
    """Pure ASGI middleware for the Ray Serve proxy (see the module docstring)."""

    def __init__(self, app, n_chars: int = PREFIX_CHARS):
        self.app, self.n_chars = app, n_chars

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in _GENERATION or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        messages, more = [], True
        if not any(k.lower() == SESSION_HEADER for k, _ in headers):
            body = b""
            while more:  # read the whole body (then replay it) to find the key in it
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request":
                    break
                body += message.get("body", b"")
                more = message.get("more_body", False) and len(body) <= _MAX_PARSED
            key = session_key(body, n_chars=self.n_chars) if not more else ""
            if key:
                scope = dict(scope, headers=[*headers, (SESSION_HEADER, key.encode("latin-1", "replace"))])

        async def replay():
            return messages.pop(0) if messages else await receive()

        sse = started = done = False

        async def watch(message):
            nonlocal sse, started, done
            if message["type"] == "http.response.start":
                started = True
                ctype = dict(message.get("headers") or []).get(b"content-type", b"")
                sse = ctype.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True
            await send(message)

        try:
            await self.app(scope, replay if messages else receive, watch)
        finally:
            if sse and started and not done:  # the replica went mid-stream: end the SSE body properly
                try:
                    await send({"type": "http.response.body", "body": _replica_died_event(), "more_body": False})
                except Exception:  # noqa: BLE001 - the client went too: nothing to tell
                    pass


def middlewares() -> list:
    """The callback named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: Ray's proxy wraps itself in these."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyAffinity)]
