"""The game's LLM client on top of the model manager: the drop-in for ``_call_lm_studio``.

The dataclasses mirror the game's types (``Message``, ``ModelConfig`` -- here ``ClientModelConfig`` so it
does not clash with the engine's :class:`tta_engine.config.ModelConfig` --, ``GenerationRequest``,
``GenerationResponse``). :class:`LLMClient` needs only a manager with three async methods:

- ``generate(prompt, model_name, **kw) -> str``
- ``generate_streaming(prompt, model_name, callback, **kw) -> str``
- ``complete(prompt, model_name, **kw) -> Completion`` (engine/generator.py)

where ``prompt`` is a raw string or a list of ``{"role", "content"}`` dicts (rendered by the manager with
the model's own chat template) and ``kw`` are sampling parameters (max_tokens, temperature, top_p, stop).
Cancelling the awaited coroutine cancels decoding (the manager guarantees that), which is how the
per-request ``timeout`` stops work instead of leaving it running in the background.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .config import ModelConfig, coerce_configs
from .errors import EmptyInputError, SamplingParamError, TTAEngineError
from .inputs import check_prompt
from .selection import rank_models_for_task, resolve_fallback_chain

log = logging.getLogger(__name__)

StreamCallback = Callable[[str], Any]  # sync or async; called with each text delta

_TimeoutBases: tuple[type, ...] = (TTAEngineError, TimeoutError)
if asyncio.TimeoutError is not TimeoutError:  # Python 3.10: two distinct classes
    _TimeoutBases = (*_TimeoutBases, asyncio.TimeoutError)


class GenerationTimeoutError(*_TimeoutBases):  # type: ignore[misc]
    """A request ran past its timeout; its decoding was cancelled.

    Is a ``TimeoutError`` (and ``asyncio.TimeoutError``) and a ``TTAEngineError``.
    """


# Caller errors: the next model would fail the same way, so call_with_fallback raises them at once.
_NO_FALLBACK = (EmptyInputError, SamplingParamError)


# --- the game's types ------------------------------------------------------------------------------

@dataclass
class Message:
    role: str
    content: str


@dataclass
class ClientModelConfig:
    """The game's per-model call settings. ``timeout`` (seconds, None = unbounded) bounds a whole request;
    ``structured_output`` is informational here (selection uses the engine configs' flag)."""

    name: str
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    supports_streaming: bool = True
    timeout: float | None = 60.0
    structured_output: bool = False

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, *, timeout: float | None = 60.0) -> ClientModelConfig:
        """The call settings of an engine :class:`~tta_engine.config.ModelConfig`."""
        return cls(name=cfg.name, max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                   supports_streaming=cfg.supports_streaming, timeout=timeout,
                   structured_output=cfg.structured_output)


@dataclass
class GenerationRequest:
    """A provider-interface request. None means "the model's configured default"."""

    prompt: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop_sequences: Sequence[str] = ()
    stream: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    response_format: Any = None  # structured output (engine/structured.py); None = free text


@dataclass
class GenerationResponse:
    text: str
    model_id: str
    usage: dict[str, int]  # prompt_tokens, completion_tokens, total_tokens ({} when not measured)
    latency_ms: float
    metadata: dict[str, Any] = field(default_factory=dict)


# --- helpers -------------------------------------------------------------------------------------------

def messages_to_prompt(messages: str | Sequence[Any]) -> str | list[dict[str, str]]:
    """A raw string stays a string; ``Message`` objects / dicts / anything with ``role`` and ``content``
    become ``{"role", "content"}`` dicts for the model's chat template (engine/inputs.py validates)."""
    return check_prompt(messages)


def _sampling_kwargs(max_tokens, temperature, top_p) -> dict[str, Any]:
    # `is not None`, never truthiness: temperature=0 (greedy) must reach the manager as 0.
    pairs = (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p))
    return {k: v for k, v in pairs if v is not None}


def resolve_response_format(response_format: Any = None, expect_json: bool = False,
                            json_schema: Mapping[str, Any] | None = None) -> Any:
    """The ``response_format`` of a call, from the engine's argument or the game's legacy ones:
    ``json_schema`` (a JSON Schema dict) constrains the output to that schema, ``expect_json`` to any JSON
    object. An explicit ``response_format`` wins."""
    if response_format is not None:
        return response_format
    if json_schema is not None:
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": dict(json_schema), "strict": True}}
    if expect_json:
        return {"type": "json_object"}
    return None


def _format_kwargs(response_format: Any) -> dict[str, Any]:
    # only passed when set, so managers without structured output keep working for free text
    return {} if response_format is None else {"response_format": response_format}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class LLMClient:
    """The game's client, backed by a model manager (see the module doc for the manager interface).

    ``default_timeout`` bounds :meth:`generate` and :meth:`call_with_fallback` requests when no timeout is
    given (``_call_transformers`` uses ``model_config.timeout``).
    """

    def __init__(self, model_manager, *, default_timeout: float | None = 60.0):
        self.model_manager = model_manager
        self.default_timeout = default_timeout

    # -- timeout ------------------------------------------------------------------------------------
    @staticmethod
    async def _bounded(awaitable: Awaitable, model_name: str, timeout: float | None):
        if timeout is None:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except TimeoutError as exc:  # == TimeoutError on 3.11+
            raise GenerationTimeoutError(
                f"model {model_name!r} did not finish within {timeout:g} s; the request was cancelled "
                "(decoding stopped). Raise the timeout (ClientModelConfig.timeout) or lower max_tokens."
            ) from exc

    # -- the drop-in for _call_lm_studio --------------------------------------------------------------
    async def _call_transformers(self, model_config: ClientModelConfig, messages: Sequence[Message] | str,
                                 stream: bool = False, stream_callback: StreamCallback | None = None, *,
                                 response_format: Any = None, expect_json: bool = False,
                                 json_schema: Mapping[str, Any] | None = None) -> str:
        """Generate a reply to ``messages`` with ``model_config.name``; returns the full text.

        The messages go to the manager as a list of dicts, so the model's own chat template renders them.
        ``max_tokens``, ``temperature`` (0 = greedy) and ``top_p`` come from ``model_config``. With
        ``stream`` and a model that supports streaming, each delta is passed to ``stream_callback`` (sync or
        async) as it is decoded; with ``stream`` and a model that does not, the callback receives the whole
        text once. The whole request is bounded by ``model_config.timeout``: on expiry decoding is
        cancelled and :class:`GenerationTimeoutError` (a ``TimeoutError``) is raised.

        ``response_format`` (or the game's ``expect_json`` / ``json_schema``) constrains the output
        (engine/structured.py): the reply then always parses.
        """
        prompt = messages_to_prompt(messages)
        name = model_config.name
        kwargs = _sampling_kwargs(model_config.max_tokens, model_config.temperature, model_config.top_p)
        kwargs.update(_format_kwargs(resolve_response_format(response_format, expect_json, json_schema)))
        mgr = self.model_manager
        if stream and model_config.supports_streaming:
            return await self._bounded(mgr.generate_streaming(prompt, name, stream_callback, **kwargs), name,
                                       model_config.timeout)
        text = await self._bounded(mgr.generate(prompt, name, **kwargs), name, model_config.timeout)
        if stream and stream_callback is not None:
            res = stream_callback(text)
            if inspect.isawaitable(res):
                await res
        return text

    # -- provider interface -----------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest, model_name: str, *,
                       timeout: float | None | object = ...) -> GenerationResponse:
        """Complete ``request.prompt`` (a raw string) with ``model_name``.

        None fields of the request keep the model's defaults; ``stop_sequences`` are passed as ``stop``
        (the text ends before the first match). ``usage`` and ``metadata["finish_reason"]`` /
        ``metadata["timings"]`` come from the manager's ``complete``; ``latency_ms`` is the wall time of the
        call. ``request.stream`` is not used (use :meth:`_call_transformers` with a callback to stream).
        ``timeout`` defaults to the client's ``default_timeout``.
        """
        kwargs = _sampling_kwargs(request.max_tokens, request.temperature, request.top_p)
        kwargs.update(_format_kwargs(request.response_format))
        if request.stop_sequences:
            kwargs["stop"] = list(request.stop_sequences)
        limit = self.default_timeout if timeout is ... else timeout
        t0 = time.perf_counter()
        completion = await self._bounded(self.model_manager.complete(request.prompt, model_name, **kwargs),
                                         model_name, limit)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        return GenerationResponse(
            text=completion["text"], model_id=model_name, usage=_usage(completion), latency_ms=latency_ms,
            metadata={**request.metadata, "finish_reason": completion.get("finish_reason"),
                      "timings": completion.get("timings")},
        )

    # -- task-based selection with fallbacks -----------------------------------------------------------
    async def _stats(self) -> Mapping[str, Mapping] | None:
        fn = getattr(self.model_manager, "stats", None)
        if not callable(fn):
            return None
        res = fn()
        if inspect.isawaitable(res):
            res = await res
        return res if isinstance(res, Mapping) else None

    async def call_with_fallback(self, task_type: str, messages: Sequence[Message] | str,
                                 configs: Mapping[str, Any] | None = None, *, stream: bool = False,
                                 stream_callback: StreamCallback | None = None, content_length: int | None = None,
                                 structured_output: bool = False, memory_budget_bytes: int | None = None,
                                 prefer: str = "quality", stats: Mapping[str, Mapping] | None = None,
                                 timeout: float | None | object = ..., max_tokens: int | None = None,
                                 temperature: float | None = None, top_p: float | None = None,
                                 response_format: Any = None, expect_json: bool = False,
                                 json_schema: Mapping[str, Any] | None = None) -> GenerationResponse:
        """Select a model for ``task_type`` (engine/selection.py) and answer ``messages``, falling back.

        ``configs``: engine model configs (``{name: ModelConfig}`` or the design note's dicts); default: the
        manager's ``model_configs`` attribute, else the packaged configs. ``stats`` defaults to the
        manager's ``stats()`` when it has one. The models tried, in order: the selected model, its capable
        fallbacks (:func:`resolve_fallback_chain`), then any other capable model by rank. A model that fails
        with a :class:`TTAEngineError` (ModelNotAvailableError, OverloadedError, GenerationTimeoutError, ...)
        is logged and the next one is tried; the last error is raised (with a note listing every attempt)
        when all fail. Not retried: caller errors (EmptyInputError, SamplingParamError), non-engine
        exceptions, and a streamed attempt that already delivered text to ``stream_callback`` (the consumer
        would see two answers spliced together).

        ``timeout`` (default: the client's ``default_timeout``) bounds each attempt; ``max_tokens``,
        ``temperature`` and ``top_p`` override the configs' values; ``response_format`` (or ``expect_json`` /
        ``json_schema``) constrains each attempt's output. Returns a :class:`GenerationResponse`
        whose ``model_id`` is the model that answered; ``usage`` is filled for non-streamed calls (from
        ``complete``) and ``{}`` for streamed ones; ``metadata`` holds ``task_type``, ``fallback_chain``,
        ``attempts`` (``[{"model", "error"}]`` of the failed ones) and, when known, ``finish_reason``;
        ``latency_ms`` covers the whole call, failed attempts included.
        """
        if configs is None:
            configs = getattr(self.model_manager, "model_configs", None)
        cfgs = coerce_configs(configs)
        if stats is None:
            stats = await self._stats()
        constraints = dict(content_length=content_length, structured_output=structured_output,
                           memory_budget_bytes=memory_budget_bytes)
        ranked = rank_models_for_task(task_type, cfgs, stats=stats, prefer=prefer, **constraints)
        chain = resolve_fallback_chain(ranked[0], cfgs, task_type, **constraints)
        chain += [m for m in ranked if m not in chain]
        limit = self.default_timeout if timeout is ... else timeout
        prompt = messages_to_prompt(messages)
        fmt = resolve_response_format(response_format, expect_json, json_schema)

        delivered = 0

        def counting(delta: str):
            nonlocal delivered
            delivered += 1
            return stream_callback(delta) if stream_callback is not None else None

        attempts: list[dict[str, str]] = []
        last: TTAEngineError | None = None
        t0 = time.perf_counter()
        for name in chain:
            mc = ClientModelConfig.from_model_config(cfgs[name], timeout=limit)
            mc = replace(mc, **_sampling_kwargs(max_tokens, temperature, top_p))
            try:
                if stream:
                    text = await self._call_transformers(mc, prompt, True, counting, response_format=fmt)
                    usage, finish = {}, None
                else:
                    kwargs = _sampling_kwargs(mc.max_tokens, mc.temperature, mc.top_p)
                    kwargs.update(_format_kwargs(fmt))
                    completion = await self._bounded(self.model_manager.complete(prompt, name, **kwargs), name,
                                                     mc.timeout)
                    text, usage, finish = completion["text"], _usage(completion), completion.get("finish_reason")
            except _NO_FALLBACK:
                raise
            except TTAEngineError as exc:
                attempts.append({"model": name, "error": _describe(exc)})
                last = exc
                if delivered:
                    _note(exc, f"call_with_fallback: {name!r} failed after streaming {delivered} delta(s); "
                               "not falling back (the consumer already received part of its answer)")
                    raise
                log.warning("task %r: model %r failed (%s); trying the next model", task_type, name,
                            _describe(exc))
                continue
            meta: dict[str, Any] = {"task_type": task_type, "fallback_chain": chain, "attempts": attempts}
            if finish is not None:
                meta["finish_reason"] = finish
            return GenerationResponse(text=text, model_id=name, usage=usage,
                                      latency_ms=(time.perf_counter() - t0) * 1000.0, metadata=meta)
        assert last is not None  # chain is never empty
        tried = "; ".join(f"{a['model']} ({a['error']})" for a in attempts)
        _note(last, f"call_with_fallback: every model for task {task_type!r} failed: {tried}")
        raise last


def _usage(completion: Mapping[str, Any]) -> dict[str, int]:
    u = completion.get("usage") or {}
    return {k: int(u[k]) for k in ("prompt_tokens", "completion_tokens", "total_tokens") if k in u}


def _note(exc: BaseException, text: str) -> None:
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(text)
