"""Continuous batching of concurrent requests to one causal LM, with KV prefix reuse.

One worker thread per model runs the loop:

    admit waiting requests (prefill each into its own row, reusing a cached prompt prefix)
    one batched decode step for every active row          logits [rows, vocab]
    sample per row (own params, own seed), stream deltas, retire finished / cancelled rows

Requests join and leave between steps. With the fused graph the rows share one KV buffer per layer,
[max_batch, kv_heads, capacity, head_dim]; active rows are kept packed at the front, so the batch is a
contiguous view bound in place (GroupQueryAttention takes each row's own length). Other backends
(Optimum graph, PyTorch) keep one cache per request and step the rows one after another.
A bounded queue guards admission: when it is full, ``submit`` raises OverloadedError at once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import OverloadedError
from .generator import GenerationState, TokenStream, check_context
from .sampling import SamplingParams

log = logging.getLogger(__name__)
END = object()  # sentinel emitted after the last delta


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[object], None]  # thread-safe: receives str deltas, then END (or an exception)
    state: GenerationState
    stream: TokenStream | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    cache: object = None  # per-request cache (non-fused backends)
    last_token: int = -1
    reused_tokens: int = 0

    def cancel(self) -> None:
        self.cancelled.set()


class _RowsView:
    """Rows [start, stop) of a batched FusedKVCache, shaped like a cache for OrtDecoder.forward."""

    def __init__(self, big, start: int, stop: int):
        self.keys = [k[start:stop] for k in big.keys]
        self.values = [v[start:stop] for v in big.values]
        self.lengths = big.lengths[start:stop].copy()
        self.capacity = big.capacity

    def ensure_capacity(self, needed: int) -> None:
        assert needed <= self.capacity, "scheduler must grow the batched cache before a step"


class PrefixCache:
    """Bounded LRU of prompt KV states. Keys valid for a prompt are valid for every prefix of it, so a
    lookup returns the longest common prefix with any stored prompt."""

    def __init__(self, max_entries: int = 8, min_tokens: int = 16):
        self.max_entries, self.min_tokens = max_entries, min_tokens
        self.entries: collections.OrderedDict[tuple[int, ...], tuple[list, list]] = collections.OrderedDict()
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def lookup(self, prompt: Sequence[int]) -> tuple[int, tuple[list, list] | None]:
        best, best_key = 0, None
        prompt_arr = np.asarray(prompt)
        with self.lock:
            for key in self.entries:
                n = min(len(key), len(prompt_arr))
                diff = np.flatnonzero(np.asarray(key[:n]) != prompt_arr[:n])
                common = int(diff[0]) if diff.size else n
                if common > best:
                    best, best_key = common, key
            if best_key is None or best < self.min_tokens:
                self.misses += 1
                return 0, None
            self.entries.move_to_end(best_key)
            self.hits += 1
            return best, self.entries[best_key]

    def store(self, prompt: Sequence[int], big, row: int | None) -> None:
        n = len(prompt)
        if row is None or n < self.min_tokens or self.max_entries <= 0:
            return
        keys = [k[row, :, :n].copy() for k in big.keys]
        values = [v[row, :, :n].copy() for v in big.values]
        with self.lock:
            self.entries[tuple(prompt)] = (keys, values)
            self.entries.move_to_end(tuple(prompt))
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)

class BatchScheduler:
    def __init__(self, lm, *, max_batch: int = 16, max_queue: int = 64, prefix_cache_entries: int = 8,
                 initial_capacity: int = 512):
        self.lm, self.backend = lm, lm.backend
        self.max_batch, self.max_queue = max_batch, max_queue
        self.fused = getattr(self.backend, "layout", None) == "fused"
        self.prefix = PrefixCache(prefix_cache_entries) if self.fused else None
        self.big = self.backend.new_cache(max_batch, capacity=initial_capacity) if self.fused else None
        self.pending: collections.deque[Request] = collections.deque()
        self.active: list[Request] = []
        self.cond = threading.Condition()
        self.closed = False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name=f"tta-sched-{lm.name}", daemon=True)
        self.thread.start()

    # -- API ----------------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, emit: Callable[[object], None],
               state: GenerationState | None = None) -> Request:
        prompt_ids = list(prompt_ids)
        check_context(len(prompt_ids), params.max_new_tokens, self.backend.context_length)
        req = Request(prompt_ids, params, emit, state or GenerationState(len(prompt_ids)))
        req.state.prompt_len = len(prompt_ids)
        with self.cond:
            if self.closed:
                raise OverloadedError(f"model {self.lm.name!r} is being unloaded; retry the request")
            if len(self.pending) >= self.max_queue:
                raise OverloadedError(
                    f"model {self.lm.name!r} has {len(self.pending)} requests waiting (queue limit "
                    f"{self.max_queue}); retry later or raise max_queue"
                )
            self.pending.append(req)
            self.cond.notify()
        return req

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()
        if self.big is not None:
            self.big.close()

    # -- loop ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.pending and not self.active:
                    self.cond.wait()
                if self.closed:
                    doomed = list(self.pending) + self.active
                    self.pending.clear()
                    self.active = []
                    break
                admit = []
                while self.pending and len(self.active) + len(admit) < self.max_batch:
                    admit.append(self.pending.popleft())
            for req in admit:
                self._guard(req, self._admit)
            if self.active:
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the loop
                    log.exception("decode step failed")
                    for req in list(self.active):
                        self._retire(req, exc)
        for req in doomed:
            req.stream and req.stream.cancel()
            req.emit(END)

    def _guard(self, req: Request, fn) -> None:
        try:
            fn(req)
        except Exception as exc:  # noqa: BLE001
            log.exception("prefill failed")
            self._retire(req, exc)

    def _admit(self, req: Request) -> None:
        if req.cancelled.is_set():
            req.state.finish_reason = "cancelled"
            req.emit(END)
            return
        req.stream = TokenStream(self.lm.tokenizer, req.prompt_ids, req.params, self.lm.eos_ids, req.state)
        if self.fused:
            row = len(self.active)
            self.active.append(req)
            logits = self._prefill_row(req, row)
            req.state.t_prefill = time.perf_counter()
            self._take(req, logits)  # the first token goes out before the prompt's KV is saved for reuse
            if self.prefix is not None and not req.cancelled.is_set():
                self.prefix.store(req.prompt_ids, self.big, row if req in self.active else None)
            return
        else:
            req.cache = self.backend.new_cache(1, capacity=len(req.prompt_ids) + req.params.max_new_tokens)
            logits = self.backend.forward(req.cache, np.asarray([req.prompt_ids], dtype=np.int64))[0]
            self.active.append(req)
        req.state.t_prefill = time.perf_counter()
        self._take(req, logits)

    def _prefill_row(self, req: Request, row: int) -> np.ndarray:
        prompt = req.prompt_ids
        self.big.ensure_capacity(len(prompt) + req.params.max_new_tokens)
        reuse, entry = self.prefix.lookup(prompt) if self.prefix else (0, None)
        reuse = min(reuse, len(prompt) - 1)  # the last prompt token is always run, for its logits
        self.big.lengths[row] = 0
        if entry is not None and reuse > 0:
            for dst, src in ((self.big.keys, entry[0]), (self.big.values, entry[1])):
                for i, buf in enumerate(dst):
                    buf[row, :, :reuse] = src[i][:, :reuse]
            self.big.lengths[row] = reuse
        req.reused_tokens = reuse
        view = _RowsView(self.big, row, row + 1)
        logits = self.backend.forward(view, np.asarray([prompt[reuse:]], dtype=np.int64))[0]
        self.big.lengths[row] = view.lengths[0]
        return logits

    def _step(self) -> None:
        self.steps += 1
        if self.fused:
            n = len(self.active)
            need = int(self.big.lengths[:n].max()) + 1
            self.big.ensure_capacity(need)
            view = _RowsView(self.big, 0, n)
            tokens = np.array([[r.last_token] for r in self.active], dtype=np.int64)
            logits = self.backend.forward(view, tokens)
            self.big.lengths[:n] = view.lengths
            for req, row_logits in zip(list(self.active), logits, strict=True):
                self._take(req, row_logits)
        else:
            for req in list(self.active):
                logits = self.backend.forward(req.cache, np.array([[req.last_token]], dtype=np.int64))[0]
                self._take(req, logits)

    def _take(self, req: Request, logits: np.ndarray) -> None:
        """Sample the next token of ``req`` and stream it; retire the request when it is done."""
        if req.cancelled.is_set():
            req.stream.cancel()
            self._retire(req)
            return
        token = req.stream.sample(logits)
        delta = req.stream.accept(token)
        if delta:
            req.emit(delta)
        if req.stream.done:
            self._retire(req)
        else:
            req.last_token = token

    def _retire(self, req: Request, error: Exception | None = None) -> None:
        if req in self.active:
            row = self.active.index(req)
            last = len(self.active) - 1
            if self.fused:  # keep active rows packed: move the last row into the hole
                if row != last:
                    for bufs in (self.big.keys, self.big.values):
                        for buf in bufs:
                            buf[row] = buf[last]
                    self.big.lengths[row] = self.big.lengths[last]
                    self.active[row] = self.active[last]
                self.big.lengths[last] = 0
                self.active.pop()
            else:
                self.active.pop(row)
        if req.cache is not None:
            req.cache.close()
            req.cache = None
        req.emit(error if error is not None else END)
