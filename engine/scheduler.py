"""Continuous batching of concurrent requests to one causal LM, with KV prefix reuse.

One worker thread per model runs the loop:

    admit waiting requests (prefill each into its own row, reusing a cached prompt prefix)
    one batched decode step for every active row          logits [rows, vocab]
    sample per row (own params, own seed), stream deltas, retire finished / cancelled rows

Requests join and leave between steps. With the fused graph the rows share one KV buffer per layer,
[max_batch, kv_heads, capacity, head_dim]; active rows are kept packed at the front, so the batch is a
contiguous view bound in place (GroupQueryAttention takes each row's own length). Other backends
(Optimum graph, PyTorch) keep one cache per request and step the rows one after another.

Determinism: a request's output depends only on the request (prompt, sampling parameters, seed), not
on the cache state or on what else is batched. Measured facts it rests on (benchmarks/
measure_invariance.py, int4 default and tiny models): a decode step computes each row bit-identically
to stepping that row alone; the prefill graph computes a position identically however the prompt is
split into chunks of >= 2 tokens, but differently in a 1-token chunk or on the decode graph. So prompts
always run on the prefill graph (OrtDecoder.prefill), reuse leaves at least 2 prompt tokens to compute,
and only "canonical" KV is reused -- positions a cold prefill would compute the same way: prompts, not
replies (decoded on the decode graph). Each request samples with its own seeded generator.

Prefix reuse (fused graph): a finished request's row keeps its KV -- prompt *and* reply -- resident,
and while the model has nothing else to do the scheduler recomputes the reply part on the prefill graph,
a chunk at a time (``_canonicalize_one``), so the next turn of the same conversation, which repeats all
of it, prefills only its new tokens, in place, without a copy. A new prompt is
matched (longest common token prefix) against the canonical KV of the resident rows, the rows still
decoding, and a bounded LRU of KV copies (``PrefixCache``) that keeps a conversation's KV when its row
is needed by another one.
A bounded queue guards admission: when it is full, ``submit`` raises OverloadedError at once.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import ModelUnloadedError, OverloadedError
from .generator import GenerationState, TokenStream, check_context, prefill
from .sampling import SamplingParams

log = logging.getLogger(__name__)
END = object()  # sentinel emitted after the last delta


@dataclass(eq=False)  # requests compare by identity: ``req in self.active`` must not compare prompts
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
    grammar: object = None  # structured output: a CompiledGrammar (engine/structured.py) or None

    def cancel(self) -> None:
        self.cancelled.set()


def common_prefix(a: Sequence[int], b: np.ndarray) -> int:
    """Length of the common prefix of token sequences ``a`` and ``b``."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != b[:n])
    return int(diff[0]) if diff.size else n


class PrefixCache:
    """LRU of KV copies keyed by their token sequence, bounded by entries and bytes. Keys valid for a sequence are valid for
    every prefix of it, so a lookup returns the longest common prefix with any stored sequence."""

    def __init__(self, max_entries: int = 8, min_tokens: int = 16, max_bytes: int = 256 << 20):
        self.max_entries, self.min_tokens, self.max_bytes = max_entries, min_tokens, max_bytes
        self.entries: collections.OrderedDict[tuple[int, ...], tuple[list, list]] = collections.OrderedDict()
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def lookup(self, prompt: Sequence[int]) -> tuple[int, tuple[list, list] | None]:
        best, best_key = 0, None
        prompt_arr = np.asarray(prompt)
        with self.lock:
            for key in self.entries:
                common = common_prefix(key, prompt_arr)
                if common > best:
                    best, best_key = common, key
            if best_key is None:
                return 0, None
            self.entries.move_to_end(best_key)
            return best, self.entries[best_key]

    def store(self, tokens: Sequence[int], big, row: int) -> None:
        """Copy the KV of ``tokens`` (held by row ``row`` of ``big``) into the cache."""
        n, key = len(tokens), tuple(tokens)
        if n < self.min_tokens or self.max_entries <= 0:
            return
        with self.lock:
            if any(len(k) >= n and k[:n] == key for k in self.entries):
                return  # already covered by a stored sequence
        snapshot = big.snapshot_row(row, n)
        with self.lock:
            for k in [k for k in self.entries if len(k) < n and key[:len(k)] == k]:
                del self.entries[k]  # a prefix of the new entry: redundant
            self.entries[key] = snapshot
            while len(self.entries) > self.max_entries or (len(self.entries) > 1 and self.nbytes > self.max_bytes):
                self.entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for keys, values in self.entries.values() for a in (*keys, *values))


_live: weakref.WeakSet[BatchScheduler] = weakref.WeakSet()


@atexit.register
def _close_live_schedulers() -> None:
    """Stop every scheduler thread before the interpreter finalizes. A daemon thread still inside an ONNX
    Runtime call at that point (a decode step, the idle recompute of a finished reply) wakes up to a
    finalized interpreter, which ends the thread by unwinding through ORT's C++ frames: the process then
    dies in ``std::terminate`` (exit status 134) after its work succeeded. Closing finishes the current
    step, fails what is queued (ModelUnloadedError) and joins the thread."""
    for scheduler in list(_live):
        scheduler.close()


class BatchScheduler:
    def __init__(self, lm, *, max_batch: int = 16, max_queue: int = 64, prefix_cache_entries: int = 8,
                 prefix_cache_bytes: int = 256 << 20, initial_capacity: int = 512, wide_step_rows: int = 0):
        self.lm, self.backend = lm, lm.backend
        # Throughput option, off by default (0): decode steps with at least this many rows run on the
        # artifact's prefill graph (an int4 artifact's int8 graph: AMX/VNNI GEMMs scale with rows, int4
        # MatMulNBits hardly does). Rows decoded in such steps follow int8 numerics, so a request's text
        # then depends on how many others run beside it.
        self.wide_step_rows = wide_step_rows
        self.max_batch, self.max_queue = max_batch, max_queue
        self.fused = getattr(self.backend, "layout", None) == "fused"
        self.prefix = PrefixCache(prefix_cache_entries, max_bytes=prefix_cache_bytes) if self.fused else None
        self.reuse = self.fused and prefix_cache_entries > 0
        self.big = self.backend.new_cache(max_batch, capacity=initial_capacity) if self.fused else None
        self.resident: list[tuple[int, ...] | None] = [None] * max_batch  # free rows' KV, by token sequence
        self.canon = [0] * max_batch  # positions [0, canon) of a row hold canonical KV (reusable)
        self.pending: collections.deque[Request] = collections.deque()
        self.active: list[Request] = []
        self.cond = threading.Condition()
        self.closed = False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name=f"tta-sched-{lm.name}", daemon=True)
        self.thread.start()
        _live.add(self)

    # -- API ----------------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, emit: Callable[[object], None],
               state: GenerationState | None = None, grammar=None) -> Request:
        prompt_ids = list(prompt_ids)
        check_context(len(prompt_ids), params.max_new_tokens, self.backend.context_length)
        req = Request(prompt_ids, params, emit, state or GenerationState(len(prompt_ids)), grammar=grammar)
        req.state.prompt_len = len(prompt_ids)
        with self.cond:
            if self.closed:
                raise ModelUnloadedError(f"model {self.lm.name!r} is being unloaded; retry the request")
            if len(self.pending) >= self.max_queue:
                self._drop_cancelled_pending()
            if len(self.pending) >= self.max_queue:
                raise OverloadedError(
                    f"model {self.lm.name!r} has {len(self.pending)} requests waiting (queue limit "
                    f"{self.max_queue}); retry later or raise max_queue"
                )
            self.pending.append(req)
            self.cond.notify()
        return req

    def _drop_cancelled_pending(self) -> None:
        """Free the queue slots of requests cancelled while waiting (called with ``cond`` held): a
        client that gave up must not keep a slot until the loop reaches it."""
        dropped = [r for r in self.pending if r.cancelled.is_set()]
        if not dropped:
            return
        self.pending = collections.deque(r for r in self.pending if not r.cancelled.is_set())
        for req in dropped:
            req.state.finish_reason = "cancelled"
            req.emit(END)

    def settled(self) -> bool:
        """Nothing queued or decoding, and every resident row's reply recomputed for exact reuse (the
        state a conversation's next turn finds after the player's think-time)."""
        with self.cond:
            return not (self.pending or self.active or self._idle_work())

    def close(self) -> None:
        """Stop the loop (queued and active requests fail with ModelUnloadedError), join its thread and
        free the KV buffer. Idempotent."""
        with self.cond:
            was_closed, self.closed = self.closed, True
            self.cond.notify()
        self.thread.join()
        _live.discard(self)
        if self.big is not None and not was_closed:
            self.big.close()

    # -- loop ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.pending and not self.active and not self._idle_work():
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
            elif not admit:  # idle: make a resident conversation's reply reusable, one chunk at a time
                try:
                    self._canonicalize_one()
                except Exception:  # noqa: BLE001 - a failure only costs reuse
                    log.exception("recomputing a resident row failed")
                    self.resident = [None] * self.max_batch
        for req in doomed:  # unfinished work fails loudly: no empty or truncated text posing as an answer
            if req.stream is not None:
                req.stream.cancel()
                req.stream.release()
            if req.cache is not None:
                req.cache.close()
                req.cache = None
            req.emit(ModelUnloadedError(
                f"model {self.lm.name!r} was unloaded before this request finished "
                f"({len(req.state.tokens)} tokens generated); retry the request"))

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
        req.stream = TokenStream(self.lm.tokenizer, req.prompt_ids, req.params, self.lm.eos_ids, req.state,
                                 req.grammar)
        req.stream.prepare()  # a constrained request's first mask is computed while the prompt prefills
        if self.fused:
            row = len(self.active)
            self.active.append(req)
            logits = self._prefill_row(req, row)
            req.state.t_prefill = time.perf_counter()
            self._take(req, logits)
            return
        else:
            req.cache = self.backend.new_cache(1, capacity=len(req.prompt_ids) + req.params.max_new_tokens)
            logits = prefill(self.backend, req.cache, req.prompt_ids)
            self.active.append(req)
        req.state.t_prefill = time.perf_counter()
        self._take(req, logits)

    def _prefill_row(self, req: Request, row: int) -> np.ndarray:
        prompt, big = req.prompt_ids, self.big
        big.ensure_capacity(len(prompt) + req.params.max_new_tokens, keep=self._rows_in_use())
        reuse, source = self._best_prefix(prompt, row) if self.reuse else (0, None)
        # at least 2 prompt tokens are computed (a 1-token chunk has other numerics than the same position
        # in a longer chunk): the rest then gets the KV and logits a cold prefill gives it
        reuse = max(min(reuse, len(prompt) - 2), 0)
        if reuse < self.prefix.min_tokens:
            reuse = 0
        resident, self.resident[row] = self.resident[row], None
        if resident is not None and not (reuse and source == row):
            self.prefix.store(resident[: self.canon[row]], big, row)  # keep the previous conversation of this row
        if reuse:
            self.prefix.hits += 1
            if isinstance(source, int):  # a row (resident, decoding, or this one) holds the prefix
                big.copy_row(row, source, reuse)
            else:  # a stored copy
                big.load_row(row, source, reuse)
        elif self.reuse:
            self.prefix.misses += 1
        big.lengths[row] = reuse
        req.reused_tokens = reuse
        view = big.rows(row, row + 1)
        logits = prefill(self.backend, view, prompt[reuse:])
        big.lengths[row] = view.lengths[0]
        self.canon[row] = len(prompt) if len(prompt) >= 2 else 0
        return logits

    def _best_prefix(self, prompt: Sequence[int], row: int) -> tuple[int, object]:
        """Longest common prefix of ``prompt`` with a row's canonical KV (resident or decoding: source =
        row index) or a stored copy (source = the copy). A row wins ties: it needs no copy, or a cheaper one."""
        prompt_arr = np.asarray(prompt)
        best, source = 0, None
        for r in range(self.max_batch):
            tokens = self._row_tokens(r)
            if tokens:
                n = common_prefix(tokens[: self.canon[r]], prompt_arr)
                if n > best or (n == best and n and r == row):  # prefer in place
                    best, source = n, r
        n, entry = self.prefix.lookup(prompt)
        if n > best:
            best, source = n, entry
        return best, source

    def _row_tokens(self, r: int) -> Sequence[int] | None:
        """The token sequence whose KV row ``r`` holds (None if nothing reusable)."""
        if self.resident[r] is not None:
            return self.resident[r]
        if r < len(self.active):
            req, n = self.active[r], int(self.big.lengths[r])
            if n:
                return req.prompt_ids[:n] + req.state.tokens[: max(n - len(req.prompt_ids), 0)]
        return None

    def _rows_in_use(self) -> dict[int, int]:
        """{row: valid KV positions} of the rows whose KV matters: decoding and resident rows."""
        rows = {r: len(t) for r, t in enumerate(self.resident) if t}
        rows.update((r, int(self.big.lengths[r])) for r in range(len(self.active)) if self.big.lengths[r])
        return rows

    def _idle_work(self) -> bool:
        """Whether a resident row holds reply KV not recomputed on the prefill graph yet."""
        return self.reuse and any(t is not None and len(t) - self.canon[r] >= 2 for r, t in enumerate(self.resident))

    def _canonicalize_one(self, chunk: int = 64) -> None:
        """Recompute up to ``chunk`` positions of one resident row's reply on the prefill graph, in place,
        as a cold prefill of the same tokens computes them (the reply was decoded on the decode graph).
        Chunks keep >= 2 tokens each; a request arriving meanwhile waits for one chunk at most."""
        for r, tokens in enumerate(self.resident):
            start = self.canon[r]
            if tokens is not None and len(tokens) - start >= 2:
                end = start + chunk if len(tokens) - (start + chunk) >= 2 else len(tokens)
                self.big.lengths[r] = start
                prefill(self.backend, self.big.rows(r, r + 1), tokens[start:end])
                self.big.lengths[r] = 0  # free row: its KV is described by resident / canon
                self.canon[r] = end
                return

    def _step(self) -> None:
        self.steps += 1
        if self.fused:
            n = len(self.active)
            need = int(self.big.lengths[:n].max()) + 1
            self.big.ensure_capacity(need, keep=self._rows_in_use())
            view = self.big.rows(0, n)
            for req in self.active:
                req.stream.prepare()  # constrained rows: masks computed while the forward pass runs
            tokens = np.array([[r.last_token] for r in self.active], dtype=np.int64)
            wide = bool(self.wide_step_rows) and n >= self.wide_step_rows
            logits = self.backend.forward(view, tokens, prefill_graph=wide)  # fused: always an OrtDecoder
            self.big.lengths[:n] = view.lengths
            for req, row_logits in zip(list(self.active), logits, strict=True):
                self._take(req, row_logits)
        else:
            for req in list(self.active):
                req.stream.prepare()
                logits = self.backend.forward(req.cache, np.array([[req.last_token]], dtype=np.int64))[0]
                self._take(req, logits)

    def _take(self, req: Request, logits: np.ndarray) -> None:
        """Sample the next token of ``req`` and stream it; retire the request when it is done."""
        if req.cancelled.is_set():
            req.stream.cancel()
            self._retire(req)
            return
        try:
            token = req.stream.sample(logits)
            delta = req.stream.accept(token)
        except Exception as exc:  # noqa: BLE001 - e.g. StructuredOutputError: fails this request only
            log.warning("request failed while sampling: %s", exc)
            self._retire(req, exc)
            return
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
            if self.fused:
                big = self.big
                keep = self.reuse and error is None and int(big.lengths[row]) >= self.prefix.min_tokens
                tokens = tuple(self._row_tokens(row) or ()) if keep else ()
                if row != last:  # keep active rows packed: move the last row into the hole
                    if keep:  # the hole's KV is about to be overwritten: keep a copy of its canonical part
                        self.prefix.store(tokens[: self.canon[row]], big, row)
                    big.copy_row(row, last, int(big.lengths[last]))
                    big.lengths[row] = big.lengths[last]
                    self.canon[row] = self.canon[last]
                    self.active[row] = self.active[last]
                    self.resident[last], self.canon[last] = None, 0
                else:  # the row stays where it is, resident, for the conversation's next turn
                    self.resident[last] = tokens or None
                    self.canon[last] = self.canon[last] if tokens else 0
                big.lengths[last] = 0
                self.active.pop()
            else:
                self.active.pop(row)
        if req.cache is not None:
            req.cache.close()
            req.cache = None
        if req.stream is not None:
            req.stream.release()
        req.emit(error if error is not None else END)


async def stream_request(scheduler: BatchScheduler, prompt_ids: Sequence[int], params: SamplingParams,
                         state: GenerationState, grammar=None, *,
                         on_submit: Callable[[Request], None] | None = None,
                         on_end: Callable[[Request, bool, bool], None] | None = None) -> AsyncIterator[str]:
    """The one async path: submit a request to ``scheduler`` and yield its text deltas as they arrive.

    The scheduler's thread hands deltas to this event loop (``call_soon_threadsafe``). Closing the
    iterator or cancelling the task that consumes it cancels the request: the scheduler drops its row at
    its next step. ``on_submit(req)`` runs once the request is queued; ``on_end(req, finished, failed)``
    once it ends, however it ends (finished: END arrived; failed: the scheduler sent an exception)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nothing left to deliver to
            pass

    req = scheduler.submit(prompt_ids, params, emit, state, grammar=grammar)
    if on_submit is not None:
        on_submit(req)
    finished = failed = False
    try:
        while True:
            item = await queue.get()
            if item is END:
                finished = True
                return
            if isinstance(item, BaseException):
                failed = True
                raise item
            yield item
    finally:
        req.cancel()  # no-op when finished; otherwise the scheduler drops the row at its next step
        if on_end is not None:
            on_end(req, finished, failed)
