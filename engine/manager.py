"""The model manager of the design note: one object that loads, evicts and serves every model.

``TransformersModelManager(model_configs, cache_dir)`` with the design note's methods — ``load_model``,
``unload_model``, ``async generate``, ``async generate_streaming(prompt, model_name, callback)``,
``get_embeddings`` — plus ``astream`` (async iterator), ``complete`` (a Completion with usage and
timings), ``chat`` and ``stats``. Models load on first use (the compiled artifact when it exists, else
the PyTorch fallback), are evicted least-recently-used beyond ``max_loaded_models`` or a memory budget
(bytes measured from the artifact files / the weights), and concurrent requests to one causal LM are
batched by a scheduler (engine/scheduler.py) behind a bounded queue.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig, coerce_configs
from .errors import TTAEngineError, UnknownModelError
from .generator import Completion, GenerationState
from .scheduler import END, BatchScheduler

log = logging.getLogger(__name__)


@dataclass
class ModelStats:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_seconds: float = 0.0
    ttft_seconds: float = 0.0
    reused_prompt_tokens: int = 0
    load_seconds: float = 0.0
    loads: int = 0
    embeddings: int = 0
    embedding_cache_hits: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["tokens_per_s"] = self.completion_tokens / self.decode_seconds if self.decode_seconds else None
        d["mean_ttft_ms"] = 1000 * self.ttft_seconds / self.completed if self.completed else None
        return d


@dataclass
class _Loaded:
    name: str
    kind: str  # "causal_lm" | "embedding"
    model: Any  # LanguageModel | OrtEncoder | TorchEncoder
    size_bytes: int
    backend: str
    scheduler: BatchScheduler | None = None
    in_flight: int = 0
    tokenizer: Any = None


@dataclass
class _EmbeddingCache:
    capacity: int
    data: collections.OrderedDict = field(default_factory=collections.OrderedDict)

    def get(self, key):
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        return None

    def put(self, key, value) -> None:
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.capacity:
            self.data.popitem(last=False)


class TransformersModelManager:
    """Central manager for the TTA game's models (thread-safe and asyncio-safe)."""

    def __init__(self, model_configs: Mapping[str, Any] | None = None, cache_dir: str = ".model_cache", *,
                 artifacts_root: str | Path | None = None, max_loaded_models: int = 4,
                 memory_budget_bytes: int | None = None, max_batch: int = 16, max_queue: int = 64,
                 prefix_cache_entries: int = 8, prefix_cache_bytes: int = 256 << 20,
                 embedding_cache_size: int = 4096, threads: int | None = None, backend: str | None = None,
                 wide_step_rows: int = 0):
        self.model_configs: dict[str, ModelConfig] = coerce_configs(model_configs)
        self.cache_dir = cache_dir
        self.artifacts_root = artifacts_root
        self.max_loaded_models = max_loaded_models
        self.memory_budget_bytes = memory_budget_bytes
        self.max_batch, self.max_queue, self.prefix_cache_entries = max_batch, max_queue, prefix_cache_entries
        self.prefix_cache_bytes, self.wide_step_rows = prefix_cache_bytes, wide_step_rows
        self.threads, self.backend = threads, backend
        self._loaded: collections.OrderedDict[str, _Loaded] = collections.OrderedDict()
        self._lock = threading.RLock()
        self._load_locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self._stats: dict[str, ModelStats] = collections.defaultdict(ModelStats)
        self._emb_cache = _EmbeddingCache(embedding_cache_size)

    # -- names --------------------------------------------------------------------------------------
    def resolve_name(self, name: str) -> str:
        """A config name, or a model_id such as the design note's 'sentence-transformers/all-MiniLM-L6-v2'."""
        if name in self.model_configs:
            return name
        by_id = [n for n, c in self.model_configs.items() if c.model_id == name]
        if by_id:  # prefer a model whose weights are available offline (a packaged source)
            by_id.sort(key=lambda n: self.model_configs[n].source.kind != "package")
            return by_id[0]
        raise UnknownModelError(name, list(self.model_configs))

    @property
    def loaded_models(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    # -- loading ------------------------------------------------------------------------------------
    def load_model(self, model_name: str) -> tuple[Any, Any]:
        """Load (or touch) a model; returns (model, tokenizer). Concurrent callers load it once."""
        entry = self._ensure_loaded(self.resolve_name(model_name))
        return entry.model, entry.tokenizer

    def _ensure_loaded(self, name: str) -> _Loaded:
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
        with self._load_locks[name]:
            with self._lock:
                if name in self._loaded:
                    self._loaded.move_to_end(name)
                    return self._loaded[name]
            cfg = self.model_configs[name]
            t0 = time.perf_counter()
            entry = self._open(cfg)
            stats = self._stats[name]
            stats.load_seconds, stats.loads = time.perf_counter() - t0, stats.loads + 1
            with self._lock:
                self._evict_for(entry.size_bytes, keep=name)
                self._loaded[name] = entry
            log.info("loaded %s (%s, %.1f MB) in %.2fs", name, entry.backend, entry.size_bytes / 1e6,
                     stats.load_seconds)
            return entry

    def _open(self, cfg: ModelConfig) -> _Loaded:
        if cfg.is_embedding:
            from .embeddings import OrtEncoder, open_encoder

            enc = open_encoder(cfg, artifacts_root=self.artifacts_root, backend=self.backend,
                               cache_dir=self.cache_dir, threads=self.threads)
            size = _encoder_size(enc)
            return _Loaded(cfg.name, "embedding", enc, size, "onnx" if isinstance(enc, OrtEncoder) else "torch",
                           tokenizer=getattr(enc, "tokenizer", None))
        from .runtime import open_language_model

        lm = open_language_model(cfg, artifacts_root=self.artifacts_root, backend=self.backend,
                                 cache_dir=self.cache_dir, threads=self.threads)
        sched = BatchScheduler(lm, max_batch=self.max_batch, max_queue=self.max_queue,
                               prefix_cache_entries=self.prefix_cache_entries,
                               prefix_cache_bytes=self.prefix_cache_bytes, wide_step_rows=self.wide_step_rows)
        return _Loaded(cfg.name, "causal_lm", lm, lm.size_bytes, lm.kind, scheduler=sched, tokenizer=lm.tokenizer)

    def _evict_for(self, incoming: int, keep: str) -> None:
        """Evict least-recently-used idle models until count and memory budget admit ``incoming``."""
        def over() -> bool:
            too_many = len(self._loaded) + 1 > self.max_loaded_models
            used = sum(e.size_bytes for e in self._loaded.values())
            too_big = self.memory_budget_bytes is not None and used + incoming > self.memory_budget_bytes
            return too_many or too_big

        for name in list(self._loaded):
            if not over():
                break
            if name != keep and self._loaded[name].in_flight == 0:
                self._unload_locked(name)
        if over():
            log.warning("memory budget / max_loaded_models exceeded: the remaining models are in use")

    def unload_model(self, model_name: str) -> None:
        """Unload a model and free its memory (sessions closed, buffers released)."""
        name = self.resolve_name(model_name)
        with self._lock:
            self._unload_locked(name)
        _release_memory()

    def _unload_locked(self, name: str) -> None:
        entry = self._loaded.pop(name, None)
        if entry is None:
            return
        if entry.scheduler is not None:
            entry.scheduler.close()
        entry.model.close()
        self._emb_cache.data = collections.OrderedDict(
            (k, v) for k, v in self._emb_cache.data.items() if k[0] != name)
        log.info("unloaded %s", name)

    def close(self) -> None:
        with self._lock:
            for name in list(self._loaded):
                self._unload_locked(name)
        _release_memory()

    # -- generation ---------------------------------------------------------------------------------
    async def _entry(self, model_name: str) -> _Loaded:
        name = self.resolve_name(model_name)
        with self._lock:
            entry = self._loaded.get(name)
            if entry is not None:
                self._loaded.move_to_end(name)
                return entry
        return await asyncio.to_thread(self._ensure_loaded, name)

    async def astream(self, prompt, model_name: str, *, state: GenerationState | None = None,
                      response_format: Any = None, **kwargs) -> AsyncIterator[str]:
        """Async iterator of text deltas. ``prompt``: a string (raw text) or a list of chat messages.
        kwargs override the config defaults (max_tokens, temperature, top_p, top_k, stop, seed, ...).
        ``response_format`` constrains the output (engine/structured.py: a Pydantic model class, a JSON
        Schema dict, {"type": "json_schema" | "json_object" | "regex" | "choice" | "grammar", ...}); one
        that does not compile raises StructuredOutputError before anything is decoded.
        Cancelling or closing the iterator stops the request's decoding at the next step."""
        entry = await self._entry(model_name)
        if entry.kind != "causal_lm":
            raise TTAEngineError(f"model {entry.name!r} is an embedding model; use get_embeddings()")
        lm = entry.model
        ids = lm.encode_prompt(prompt)
        params = lm.params(**kwargs)
        grammar = None
        if response_format is not None:
            from .structured import acompile_for_model

            grammar = await acompile_for_model(lm, response_format)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed: nothing left to deliver to
                pass

        st = state if state is not None else GenerationState(len(ids))
        req = entry.scheduler.submit(ids, params, emit, st, grammar=grammar)
        stats = self._stats[entry.name]
        stats.requests += 1
        entry.in_flight += 1
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is END:
                    finished = True
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.cancel()  # no-op when finished; otherwise the scheduler drops the row at its next step
            entry.in_flight -= 1
            self._record(stats, st, req, finished)

    def _record(self, stats: ModelStats, st: GenerationState, req, finished: bool) -> None:
        if not finished or st.finish_reason == "cancelled":
            stats.cancelled += 1
            return
        c = st.completion()
        stats.completed += 1
        stats.prompt_tokens += c["usage"]["prompt_tokens"]
        stats.completion_tokens += c["usage"]["completion_tokens"]
        stats.decode_seconds += c["timings"]["decode_s"] if c["usage"]["completion_tokens"] > 1 else 0.0
        stats.ttft_seconds += c["timings"]["time_to_first_token_s"]
        stats.reused_prompt_tokens += req.reused_tokens

    async def complete(self, prompt, model_name: str, **kwargs) -> Completion:
        state = GenerationState(0)
        async for _ in self.astream(prompt, model_name, state=state, **kwargs):
            pass
        return state.completion()

    async def generate(self, prompt, model_name: str, **kwargs) -> str:
        """Generate text (the design note's signature)."""
        return (await self.complete(prompt, model_name, **kwargs))["text"]

    async def generate_streaming(self, prompt, model_name: str, callback: Callable[[str], Any] | None,
                                 **kwargs) -> str:
        """Stream deltas to ``callback`` (sync or async) and return the full text."""
        from .runtime import deliver_to_callback

        return await deliver_to_callback(self.astream(prompt, model_name, **kwargs), callback)

    async def chat(self, messages, model_name: str, **kwargs) -> str:
        """Messages ({role, content} dicts or Message objects) rendered with the model's chat template."""
        return await self.generate(list(messages), model_name, **kwargs)

    async def generate_structured(self, prompt, model_name: str, output_model: Any, **kwargs) -> Any:
        """Generate under ``output_model``'s constraint and return it parsed and validated: an instance of a
        Pydantic model class, or the JSON value for a JSON Schema dict. Raises StructuredOutputError (with
        ``raw_text``) when max_tokens ends the output before the grammar is complete, or it does not
        validate."""
        from .structured import validate_output

        completion = await self.complete(prompt, model_name, response_format=output_model, **kwargs)
        return validate_output(completion["text"], output_model, finish_reason=completion["finish_reason"])

    # -- embeddings ---------------------------------------------------------------------------------
    def get_embeddings(self, texts: list[str],
                       model_name: str = "sentence-transformers/all-MiniLM-L6-v2") -> list[list[float]]:
        """Embeddings as lists of floats (the design note's signature), cached per (model, text)."""
        return self.embed(texts, model_name).tolist()

    def embed(self, texts, model_name: str = "sentence-transformers/all-MiniLM-L6-v2") -> np.ndarray:
        from .embeddings import _check_texts

        texts = _check_texts(texts)
        entry = self._ensure_loaded(self.resolve_name(model_name))
        if entry.kind != "embedding":
            raise TTAEngineError(f"model {entry.name!r} is not an embedding model; pick one with model_type = 'embedding'")
        stats = self._stats[entry.name]
        cached = [self._emb_cache.get((entry.name, t)) for t in texts]
        missing = sorted({t for t, v in zip(texts, cached, strict=True) if v is None})
        if missing:
            with self._lock:
                entry.in_flight += 1
            try:
                vecs = entry.model.encode(missing)
            finally:
                entry.in_flight -= 1
            for t, v in zip(missing, vecs, strict=True):
                self._emb_cache.put((entry.name, t), v)
        stats.embeddings += len(texts)
        stats.embedding_cache_hits += len(texts) - len(missing)
        return np.stack([self._emb_cache.get((entry.name, t)) for t in texts])

    async def aget_embeddings(self, texts, model_name: str = "sentence-transformers/all-MiniLM-L6-v2"):
        return await asyncio.to_thread(self.get_embeddings, texts, model_name)

    # -- monitoring ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per model: requests, tokens, tokens/s, mean time to first token, load time, memory, backend."""
        out = {}
        with self._lock:
            for name in sorted(set(self._stats) | set(self._loaded)):
                d = self._stats[name].as_dict()
                entry = self._loaded.get(name)
                d["loaded"] = entry is not None
                if entry is not None:
                    d.update(backend=entry.backend, size_bytes=entry.size_bytes, in_flight=entry.in_flight)
                    if entry.scheduler is not None and entry.scheduler.prefix is not None:
                        p = entry.scheduler.prefix
                        d.update(prefix_cache_hits=p.hits, prefix_cache_misses=p.misses)
                out[name] = d
        return out


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, so RSS
    would not drop after an unload)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _encoder_size(enc) -> int:
    if getattr(enc, "path", None) is not None:
        return sum(p.stat().st_size for p in Path(enc.path).glob("*.onnx*"))
    model = getattr(enc, "model", None)
    if model is not None and hasattr(model, "parameters"):
        return sum(p.numel() * p.element_size() for p in model.parameters())
    return 0
