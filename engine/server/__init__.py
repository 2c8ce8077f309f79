"""OpenAI-compatible HTTP server over the model manager (``tta-engine serve``; extra ``server``).

``create_app(manager, ...)`` is the FastAPI app (app.py); ``build_server`` / ``serve`` run it on uvicorn
with a graceful shutdown: on SIGTERM/SIGINT the server stops accepting, lets running requests finish for
``shutdown_grace_s`` seconds, stops the rest (streams end with an error event), then closes the manager.
FastAPI, uvicorn and prometheus-client are imported only here, on use.
"""

from __future__ import annotations

from ..errors import BackendUnavailableError

_HINT = "the server needs FastAPI, uvicorn and prometheus-client: pip install 'tta-engine[server]'"


def _require():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise BackendUnavailableError(f"{_HINT} ({exc})") from exc
    return uvicorn


def create_app(manager, **kwargs):
    _require()
    from .app import create_app as _create

    return _create(manager, **kwargs)


def build_server(manager, host: str = "127.0.0.1", port: int = 8000, *, shutdown_grace_s: float = 30.0,
                 log_level: str = "info", allowed_hosts=None, **kwargs):
    """A ``uvicorn.Server`` for the app; ``.run()`` blocks, ``.should_exit = True`` stops it.
    ``allowed_hosts``: default the names that reach ``host`` (hosts.py: loopback for a loopback bind)."""
    from .hosts import default_allowed_hosts

    uvicorn = _require()
    hosts = tuple(allowed_hosts) if allowed_hosts else default_allowed_hosts(host)
    app = create_app(manager, shutdown_grace_s=shutdown_grace_s, allowed_hosts=hosts, **kwargs)
    lifecycle = app.state.lifecycle

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            lifecycle.begin_drain()  # before uvicorn waits for the open connections
            await super().shutdown(sockets)

    # uvicorn's own limit is a backstop: our drain stops every request after shutdown_grace_s
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=shutdown_grace_s + 10, timeout_keep_alive=30)
    server = Server(config)
    server.asgi_app = app
    return server


def serve(manager, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    build_server(manager, host, port, **kwargs).run()
