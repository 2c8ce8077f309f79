"""``tta-engine serve --ray``: the OpenAI-compatible app (app.py, the same ``create_app``) on Ray Serve
replicas, each with its own ``TransformersModelManager`` (extra ``ray``: ``pip install 'tta-engine[ray]'``).

* **One app.** The deployment is ``serve.ingress`` with the app built per replica
  (``__serve_build_asgi_app__``): ``create_app(manager, ...)`` over that replica's manager, plus an
  ``X-TTA-Replica`` response header (the replica's id). No route is defined here.
* **Placement.** Each replica declares ``ray_actor_options={"num_cpus": threads}`` (its ONNX Runtime
  intra-op threads), so Ray puts ``cores // threads`` replicas on a node.
* **Session affinity** uses Ray Serve's request router API (``request_router_config``, Ray >= 2.60): Ray's
  own ``ConsistentHashRouter`` hashes ``RequestMetadata.session_id`` (the proxy fills it from the
  ``X-Session-Id`` header) onto a ring of replicas, falling back to the next replica on the ring when one is
  full or gone. The key for requests without the header (the ``user`` field, else a hash of the prompt's
  first characters) is set by a middleware in Ray's HTTP proxy (ray_proxy.py), because the proxy does not
  read bodies before routing. Not a home-made router, and no second hop: the ≤ 3 ms target forbids one.
* **Autoscaling** (``autoscaling=True`` / ``--autoscale``): ``autoscaling_config`` on Ray's count of ongoing
  requests per replica, which here is the scheduler's running + waiting requests (every request of a
  replica is one ``astream`` in its scheduler): ``target_ongoing_requests`` = ``max_batch`` (a full batch
  per replica; more waits), ``min_replicas`` 1, ``max_replicas`` = ``replicas``. A new replica gets new
  keys only: consistent hashing moves about 1/N of the conversations, which then miss their prefix once.
* **Faults.** A replica whose process dies: the stream it served ends with an OpenAI error event
  (ray_proxy.py), the router drops it, Ray's controller starts a new one (health checks every
  ``health_check_period_s``); new requests go to the living replicas meanwhile.
* **Shutdown drains**: Ray stops routing to a replica, waits up to ``graceful_shutdown_timeout_s`` (the
  ``--shutdown-grace``) for its requests to finish, then runs the app's lifespan shutdown (which stops the
  rest, as in the plain server, and closes the manager).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import BackendUnavailableError, TTAEngineError

HINT = "serve --ray needs Ray Serve: pip install 'tta-engine[ray]'"
PROXY_CALLBACK = "tta_engine.server.ray_proxy.middlewares"
# The environment of Ray's proxy actors: tta's middleware (session keys), and requests forwarded to the
# replicas over gRPC rather than as actor calls (the Ray hop: p50 7.6-8.9 -> 5.0-6.0 ms, measured paired
# on the 2-core VM, benchmarks/compare_ray.py)
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK, "RAY_SERVE_PROXY_USE_GRPC": "1"}
REPLICA_HEADER = "X-TTA-Replica"
ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
DEPLOYMENT = "tta-engine"


def require_ray():
    try:
        import ray
        from ray import serve
        from ray.serve.config import RequestRouterConfig  # noqa: F401 - the router API (Ray >= 2.60)
    except ImportError as exc:
        raise BackendUnavailableError(f"{HINT} ({exc})") from exc
    return ray, serve


@dataclass
class RaySettings:
    """What every replica needs to build its manager and app (pickled to the replicas)."""

    configs: dict
    artifacts_root: str | None = None
    replicas: int = 2
    threads: int | None = None  # per replica; default: physical cores // replicas (at least 1)
    backend: str | None = None
    device: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    max_loaded_models: int = 4
    preload: tuple[str, ...] = ()
    autoscaling: bool = False
    app_kwargs: dict = field(default_factory=dict)  # create_app's options (api_key, shutdown_grace_s, ...)

    def replica_threads(self) -> int:
        if self.threads is not None:
            if self.threads < 1:
                raise TTAEngineError(f"--threads {self.threads}: a replica needs at least 1 thread")
            return self.threads
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        return max(1, cores // max(1, self.replicas))


class _ReplicaHeader:
    """ASGI middleware: the replica's id on every response."""

    def __init__(self, app, replica: str):
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope, receive, send):
        async def tagged(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (b"x-tta-replica", self.value)])
            await send(message)

        await self.app(scope, receive, tagged if scope["type"] == "http" else send)


class EngineReplica:
    """One replica: a manager and the app over it (made a Ray Serve ingress deployment by ``deployment``)."""

    def __init__(self, settings: RaySettings):
        from ray import serve

        from ..manager import TransformersModelManager

        self.settings = settings
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.manager = TransformersModelManager(
            settings.configs, artifacts_root=settings.artifacts_root, backend=settings.backend,
            threads=settings.replica_threads(), max_batch=settings.max_batch, max_queue=settings.max_queue,
            max_loaded_models=settings.max_loaded_models, device=settings.device)

    def __serve_build_asgi_app__(self):
        from .app import create_app

        s = self.settings
        app = create_app(self.manager, preload=s.preload, **s.app_kwargs)
        app.add_middleware(_ReplicaHeader, replica=self.replica_id)
        return app

    def pid(self) -> int:  # the worker process (tests and benchmarks kill it)
        return os.getpid()


def deployment(settings: RaySettings):
    """The bound Ray Serve application: ``serve.run(deployment(settings))``."""
    _, serve = require_ray()
    from ray.serve.config import RequestRouterConfig

    if settings.replicas < 1:
        raise TTAEngineError(f"--replicas {settings.replicas}: serve at least 1 replica")
    threads = settings.replica_threads()
    grace = float(settings.app_kwargs.get("shutdown_grace_s", 30.0))
    options = dict(
        name=DEPLOYMENT, ray_actor_options={"num_cpus": threads},
        max_ongoing_requests=settings.max_batch + settings.max_queue,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER, request_router_kwargs={"num_fallback_replicas": 2}),
        graceful_shutdown_timeout_s=grace, graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=2.0, health_check_timeout_s=30.0)
    if settings.autoscaling:
        options["autoscaling_config"] = {"min_replicas": 1, "max_replicas": settings.replicas,
                                         "initial_replicas": settings.replicas,
                                         "target_ongoing_requests": settings.max_batch,
                                         "upscale_delay_s": 10.0, "downscale_delay_s": 120.0}
    else:
        options["num_replicas"] = settings.replicas
    cls = serve.ingress()(EngineReplica)
    return serve.deployment(cls, **options).bind(settings)


def start(settings: RaySettings, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          num_cpus: int | None = None, blocking: bool = False, app_name: str = "tta-engine"):
    """Connect to (``address``: ``auto``, ``ray://host:10001``) or start a Ray cluster, start Serve's HTTP
    proxy on ``host:port`` and deploy; returns the app's handle. ``blocking``: serve until SIGINT/SIGTERM,
    then shut Serve down (replicas drain)."""
    ray, serve = require_ray()
    for key, value in PROXY_ENV.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        kw = {"address": address} if address else {"num_cpus": num_cpus, "include_dashboard": False}
        try:
            ray.init(**kw, log_to_driver=False,
                     runtime_env={"env_vars": dict(PROXY_ENV)})
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise TTAEngineError(f"--address {address!r}: cannot connect to a Ray cluster there ({exc}); give "
                                 "'auto' (the cluster of this node, after 'ray start --head'), "
                                 "'ray://HOST:10001' (Ray Client) or leave it out to start one here") from exc
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(deployment(settings), name=app_name, route_prefix="/")
    if blocking:
        _block_until_signal()
        serve.shutdown()
        ray.shutdown()
    return handle


def _block_until_signal() -> None:
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
