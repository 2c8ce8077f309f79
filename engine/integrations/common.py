"""Pieces the library integrations share: the optional-import helper, a process-wide default manager,
and a background event loop that lets synchronous library APIs (LangChain's ``invoke``/``batch``,
spaCy's ``__call__``/``pipe``) submit many requests to the manager's asyncio API at once, so that its
scheduler batches them."""

from __future__ import annotations

import asyncio
import importlib
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

from ..errors import BackendUnavailableError

T = TypeVar("T")

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"

_lock = threading.Lock()
_manager = None
_loop: asyncio.AbstractEventLoop | None = None


def require(module: str, extra: str) -> Any:
    """Import an optional dependency, or raise BackendUnavailableError with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"{module} is not installed; this integration needs it: pip install 'tta-engine[{extra}]'"
        ) from exc


def default_manager():
    """One TransformersModelManager per process (packaged configs), created on first use and shared by
    every integration object that was not given a manager of its own."""
    global _manager
    with _lock:
        if _manager is None:
            from ..manager import TransformersModelManager

            _manager = TransformersModelManager(None)
        return _manager


def set_default_manager(manager) -> None:
    """Make ``manager`` the one integration objects use when they were not given one (e.g. the game's own
    manager, shared with spaCy components, which are built from config values)."""
    global _manager
    with _lock:
        _manager = manager


def background_loop() -> asyncio.AbstractEventLoop:
    """A daemon thread running an event loop (started on first use) for the synchronous entry points."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="tta-integrations-loop", daemon=True).start()
            _loop = loop
        return _loop


def run_sync(coro: Awaitable[T], timeout: float | None = None) -> T:
    """Run a coroutine on the background loop and wait for its result (callable from any thread,
    including one whose own event loop is running)."""
    fut = asyncio.run_coroutine_threadsafe(_as_coroutine(coro), background_loop())
    try:
        return fut.result(timeout)
    except BaseException:
        fut.cancel()
        raise


def iterate_sync(agen: AsyncIterator[T]) -> Iterator[T]:
    """A synchronous iterator over an async iterator, stepped on the background loop. Closing the
    iterator early closes the async one (which cancels the engine request)."""
    it = agen.__aiter__()
    done = object()

    async def step():
        try:
            return await it.__anext__()
        except StopAsyncIteration:
            return done

    try:
        while True:
            item = run_sync(step())
            if item is done:
                return
            yield item
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            run_sync(aclose())


async def _as_coroutine(aw: Awaitable[T]) -> T:
    return await aw
