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
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig, coerce_configs
from .device import parse_device
from .errors import InvalidInputError, ModelTypeError, UnknownModelError
from .generator import Completion, GenerationState
from .host_heap import limit_arenas, release_memory
from .inputs import check_texts
from .scheduler import BatchScheduler

log = logging.getLogger(__name__)


@dataclass
class ModelStats:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0  # ended by an error (e.g. ModelUnloadedError): neither completed nor cancelled
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
    device: str = "cpu"  # the resolved device: 'cpu' or 'cuda:N'
    scheduler: BatchScheduler | None = None
    in_flight: int = 0
    tokenizer: Any = None


class _EmbeddingCache:
    """LRU of embeddings keyed by (model, text), shared by every caller thread (its own lock).
    ``capacity`` 0 disables it; callers never read back what they just put (it may be evicted already)."""

    def __init__(self, capacity: int):
        self.capacity = max(int(capacity), 0)
        self.data: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            value = self.data.get(key)
            if value is not None:
                self.data.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        if self.capacity == 0:
            return
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.capacity:
                self.data.popitem(last=False)

    def drop_model(self, name: str) -> None:
        with self.lock:
            for key in [k for k in self.data if k[0] == name]:
                del self.data[key]


class TransformersModelManager:
    """Central manager for the TTA game's models (thread-safe and asyncio-safe)."""

    def __init__(self, model_configs: Mapping[str, Any] | None = None, cache_dir: str = ".model_cache", *,
                 artifacts_root: str | Path | None = None, max_loaded_models: int = 4,
                 memory_budget_bytes: int | None = None, max_batch: int = 16, max_queue: int = 64,
                 prefix_cache_entries: int = 8, prefix_cache_bytes: int = 256 << 20,
                 embedding_cache_size: int = 4096, threads: int | None = None, backend: str | None = None,
                 wide_step_rows: int = 0, export_on_demand: bool | None = None, device: str | None = None,
                 cuda_graph: bool = False):
        self.model_configs: dict[str, ModelConfig] = coerce_configs(model_configs)
        self.cache_dir = cache_dir
        self.artifacts_root = artifacts_root
        self.max_loaded_models = max_loaded_models
        self.memory_budget_bytes = memory_budget_bytes
        self.max_batch, self.max_queue, self.prefix_cache_entries = max_batch, max_queue, prefix_cache_entries
        self.prefix_cache_bytes, self.wide_step_rows = prefix_cache_bytes, wide_step_rows
        self.threads, self.backend = threads, backend
        # None: each config's own export_on_demand (default off); True/False: for every model.
        self.export_on_demand = export_on_demand
        # 'auto' | 'cpu' | 'cuda' | 'cuda:N' for every model (overrides the configs' device); None: per config
        if device is not None:
            parse_device(device)  # ConfigError now rather than at the first load
        self.device = device
        self.cuda_graph = cuda_graph  # ONNX artifacts on a GPU: decode steps replayed as CUDA graphs (opt-in)
        self._loaded: collections.OrderedDict[str, _Loaded] = collections.OrderedDict()
        self._lock = threading.RLock()
        self._load_locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self._stats: dict[str, ModelStats] = collections.defaultdict(ModelStats)
        self._emb_cache = _EmbeddingCache(embedding_cache_size)
        limit_arenas()  # models loaded and unloaded for hours: unloads must return memory (host_heap.py)

    # -- names --------------------------------------------------------------------------------------
    def resolve_name(self, name: str) -> str:
        """A config name, or a model_id such as the design note's 'sentence-transformers/all-MiniLM-L6-v2'."""
        if not isinstance(name, str):
            raise UnknownModelError(repr(name), list(self.model_configs))
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

    def _ensure_loaded(self, name: str, *, acquire: bool = False) -> _Loaded:
        """The loaded entry of ``name`` (loading it once). With ``acquire``, its ``in_flight`` count is
        raised under the same lock that found or inserted it, so no eviction can come in between; the
        caller then owes a ``_release(entry)``."""
        with self._lock:
            entry = self._touch(name, acquire)
            if entry is not None:
                return entry
        with self._load_locks[name]:
            with self._lock:
                entry = self._touch(name, acquire)
                if entry is not None:
                    return entry
            cfg = self.model_configs[name]
            t0 = time.perf_counter()
            entry = self._open(cfg)
            stats = self._stats[name]
            stats.load_seconds, stats.loads = time.perf_counter() - t0, stats.loads + 1
            with self._lock:
                self._evict_for(entry.size_bytes, keep=name)
                self._loaded[name] = entry
                if acquire:
                    entry.in_flight += 1
            log.info("loaded %s (%s, %.1f MB) in %.2fs", name, entry.backend, entry.size_bytes / 1e6,
                     stats.load_seconds)
            return entry

    def _touch(self, name: str, acquire: bool) -> _Loaded | None:
        """(under self._lock) The loaded entry, marked most recently used (and acquired), or None."""
        entry = self._loaded.get(name)
        if entry is not None:
            self._loaded.move_to_end(name)
            if acquire:
                entry.in_flight += 1
        return entry

    @contextlib.contextmanager
    def hold(self, model_name: str) -> Iterator[Any]:
        """The loaded model (loaded if needed), kept from LRU eviction while the block runs: for callers
        that drive the model themselves (the Guidance engine). Between blocks it may be evicted and is then
        loaded again; compare the yielded object with the previous one to know."""
        entry = self._ensure_loaded(self.resolve_name(model_name), acquire=True)
        try:
            yield entry.model
        finally:
            self._release(entry)

    def _release(self, entry: _Loaded) -> None:
        with self._lock:
            entry.in_flight -= 1

    def _open(self, cfg: ModelConfig) -> _Loaded:
        on_demand = cfg.export_on_demand if self.export_on_demand is None else self.export_on_demand
        if on_demand and (self.backend or cfg.backend) != "torch":
            export_missing(cfg, self.artifacts_root, cache_dir=self.cache_dir)
        if cfg.is_embedding:
            from .embeddings import OrtEncoder, open_encoder

            enc = open_encoder(cfg, artifacts_root=self.artifacts_root, backend=self.backend,
                               cache_dir=self.cache_dir, threads=self.threads, device=self.device)
            size = _encoder_size(enc)
            return _Loaded(cfg.name, "embedding", enc, size, "onnx" if isinstance(enc, OrtEncoder) else "torch",
                           device=str(enc.device), tokenizer=getattr(enc, "tokenizer", None))
        from .runtime import open_language_model

        lm = open_language_model(cfg, artifacts_root=self.artifacts_root, backend=self.backend,
                                 cache_dir=self.cache_dir, threads=self.threads, device=self.device,
                                 cuda_graph=self.cuda_graph)
        sched = lm.start_scheduler(max_batch=self.max_batch, max_queue=self.max_queue,
                                   prefix_cache_entries=self.prefix_cache_entries,
                                   prefix_cache_bytes=self.prefix_cache_bytes, wide_step_rows=self.wide_step_rows)
        return _Loaded(cfg.name, "causal_lm", lm, lm.size_bytes, lm.kind, device=lm.device, scheduler=sched,
                       tokenizer=lm.tokenizer)

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
        release_memory()

    def _unload_locked(self, name: str) -> None:
        entry = self._loaded.pop(name, None)
        if entry is None:
            return
        entry.model.close()  # a LanguageModel closes its scheduler first (queued and active requests fail)
        self._emb_cache.drop_model(name)
        log.info("unloaded %s", name)

    def close(self) -> None:
        with self._lock:
            for name in list(self._loaded):
                self._unload_locked(name)
        release_memory()

    # -- generation ---------------------------------------------------------------------------------
    async def _acquire(self, name: str) -> _Loaded:
        """The loaded entry with ``in_flight`` raised (see ``_ensure_loaded``); pair with ``_release``."""
        with self._lock:
            entry = self._touch(name, acquire=True)
        if entry is not None:
            return entry
        task = asyncio.ensure_future(asyncio.to_thread(self._ensure_loaded, name, acquire=True))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:  # the load goes on in its thread: release what it acquires
            task.add_done_callback(
                lambda t: t.cancelled() or t.exception() is not None or self._release(t.result()))
            raise

    def _kind_of(self, model_name: str, kind: str) -> str:
        """The config name of ``model_name``, checked to be a ``kind`` model before anything loads."""
        name = self.resolve_name(model_name)
        cfg = self.model_configs[name]
        if cfg.model_type != kind:
            raise ModelTypeError(name, cfg.model_type, kind)
        return name

    async def astream(self, prompt, model_name: str, *, state: GenerationState | None = None,
                      response_format: Any = None, **kwargs) -> AsyncIterator[str]:
        """Async iterator of text deltas. ``prompt``: a string (raw text) or a list of chat messages.
        kwargs override the config defaults (max_tokens, temperature, top_p, top_k, stop, seed, ...).
        ``response_format`` constrains the output (engine/structured.py: a Pydantic model class, a JSON
        Schema dict, {"type": "json_schema" | "json_object" | "regex" | "choice" | "grammar", ...}); one
        that does not compile raises StructuredOutputError before anything is decoded.
        Cancelling or closing the iterator stops the request's decoding at the next step."""
        name = self._kind_of(model_name, "causal_lm")
        entry = await self._acquire(name)
        try:
            stats = self._stats[entry.name]

            def submitted(_req) -> None:
                stats.requests += 1

            def ended(req, finished: bool, failed: bool) -> None:
                self._record(stats, req, finished, failed)

            async for delta in entry.model.astream(prompt, state=state, response_format=response_format,
                                                   on_submit=submitted, on_end=ended, **kwargs):
                yield delta
        finally:
            self._release(entry)

    def _record(self, stats: ModelStats, req, finished: bool, failed: bool = False) -> None:
        st = req.state
        if failed:
            stats.failed += 1
            return
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
        """Embeddings [n, dim] in the order of ``texts``; each distinct text is encoded once per call and
        kept in an LRU of ``embedding_cache_size`` entries (any number of texts works, cache or not).
        A text longer than the encoder's window is truncated to it, as sentence-transformers does."""
        return self.embed_counted(texts, model_name)[0]

    def embed_counted(self, texts, model_name: str = "sentence-transformers/all-MiniLM-L6-v2", *,
                      truncate: bool = True) -> tuple[np.ndarray, int]:
        """``embed`` plus the number of tokens encoded (the texts tokenized once, cached texts
        included). ``truncate=False``: a text longer than the encoder's window raises
        InvalidInputError naming it instead of being truncated."""
        texts = check_texts(texts)
        name = self._kind_of(model_name, "embedding")
        entry = self._ensure_loaded(name, acquire=True)
        try:
            found = {t: self._emb_cache.get((name, t)) for t in dict.fromkeys(texts)}
            missing = [t for t, v in found.items() if v is None]
            if missing:
                vecs, counts, cut = entry.model.encode_counted(missing)
                for t, v, n, c in zip(missing, vecs, counts, cut, strict=True):
                    found[t] = (v, n, c)
                    self._emb_cache.put((name, t), found[t])
        finally:
            self._release(entry)
        if not truncate:
            over = [i for i, t in enumerate(texts) if found[t][2]]
            if over:
                window = getattr(entry.model, "max_seq_length", None)
                raise InvalidInputError(
                    f"input[{over[0]}] ({len(over)} of {len(texts)} texts) is longer than the {window}-token window "
                    f"of {name!r}; shorten or split it, or allow truncation to the window (truncate=true)")
        stats = self._stats[name]
        with self._lock:
            stats.embeddings += len(texts)
            stats.embedding_cache_hits += len(texts) - len(missing)
        return np.stack([found[t][0] for t in texts]), sum(found[t][1] for t in texts)

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
                    d.update(backend=entry.backend, device=entry.device, size_bytes=entry.size_bytes,
                             in_flight=entry.in_flight)
                    if entry.scheduler is not None:  # requests waiting for a row, rows decoding, decode steps
                        d.update(queue_depth=len(entry.scheduler.pending), active_rows=len(entry.scheduler.active),
                                 scheduler_steps=entry.scheduler.steps)
                    if entry.scheduler is not None and entry.scheduler.prefix is not None:
                        p = entry.scheduler.prefix
                        d.update(prefix_cache_hits=p.hits, prefix_cache_misses=p.misses)
                out[name] = d
        return out


def export_missing(cfg: ModelConfig, artifacts_root: str | Path | None = None, *, cache_dir: str | None = None,
                   announce: Callable[[str], Any] | None = None) -> bool:
    """Export ``cfg``'s artifact when none is published (export on demand: the manager's
    ``export_on_demand`` setting, the CLI's ``--export``), announcing it and each stage with ``announce``
    (default: a WARNING log line). A damaged artifact is left alone (loading it raises a typed error).
    Returns whether it exported."""
    from .artifact import artifact_dir, artifact_present

    path = artifact_dir(artifacts_root, cfg.name, cfg.precision)
    if artifact_present(path):
        return False
    from tta_engine.export.pipeline import ExportOptions, export_model

    say = announce or (lambda line: log.warning("%s", line))
    say(f"no {cfg.precision} artifact for {cfg.name} at {path}: exporting it now (export on demand; "
        "this takes a while)")
    export_model(cfg, ExportOptions(precision=cfg.precision, out_root=path.parents[1], cache_dir=cache_dir),
                 progress=say)
    return True


def _encoder_size(enc) -> int:
    if getattr(enc, "path", None) is not None:
        return sum(p.stat().st_size for p in Path(enc.path).glob("*.onnx*"))
    model = getattr(enc, "model", None)
    if model is not None and hasattr(model, "parameters"):
        return sum(p.numel() * p.element_size() for p in model.parameters())
    return 0
