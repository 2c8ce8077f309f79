"""The decode loop: prefill, decode_one_token, sample — one generator behind every public call.

A *backend* is anything with ``new_cache(batch, capacity)``, ``forward(cache, ids[batch, seq]) ->
logits[batch, vocab]`` and ``context_length`` (engine/ort_decoder.py, engine/torch_backend.py).
``generate_events`` is the single generator; non-streaming calls consume it, streaming calls forward its
deltas. Closing it (or breaking out of the stream) stops decoding at once and frees the KV cache.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypedDict

import numpy as np

from .errors import ContextLengthError, EmptyInputError
from .sampling import SamplingParams, make_rng, process_logits, sample_token
from .textstream import IncrementalDetokenizer, StopStringMatcher

FinishReason = Literal["stop", "length", "cancelled"]


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(TypedDict):
    prefill_s: float
    time_to_first_token_s: float
    decode_s: float
    decode_tokens_per_s: float


class Completion(TypedDict):
    """What a non-streaming call returns (llama-cpp-python style typed dict)."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


@dataclass
class GenerationState:
    """Running counters of one request; the final Completion is built from it."""

    prompt_len: int
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: FinishReason = "length"
    t_start: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_prefill: float | None = None

    def completion(self) -> Completion:
        end = time.perf_counter()
        first = self.t_first or end
        decode_s = max(end - first, 1e-9)
        n_decode = max(len(self.tokens) - 1, 0)
        return Completion(
            text="".join(self.text), token_ids=list(self.tokens), finish_reason=self.finish_reason,
            usage=Usage(prompt_tokens=self.prompt_len, completion_tokens=len(self.tokens),
                        total_tokens=self.prompt_len + len(self.tokens)),
            timings=Timings(prefill_s=(self.t_prefill or end) - self.t_start,
                            time_to_first_token_s=first - self.t_start, decode_s=decode_s,
                            decode_tokens_per_s=n_decode / decode_s if n_decode else 0.0),
        )


def check_context(prompt_len: int, max_new_tokens: int, context_length: int) -> None:
    if prompt_len == 0:
        raise EmptyInputError("the prompt is empty: pass at least one token of text")
    if prompt_len + max_new_tokens > context_length:
        raise ContextLengthError(
            f"{prompt_len} prompt tokens + {max_new_tokens} new tokens exceed the context of {context_length} "
            "tokens; shorten the prompt or lower max_new_tokens."
        )


def prefill(backend, cache, prompt_ids: Sequence[int]) -> np.ndarray:
    """Run the prompt through the model (the backend's own chunking when it has one: OrtDecoder.prefill);
    logits of the last position [vocab]."""
    ids = np.asarray([prompt_ids], dtype=np.int64)
    run = getattr(backend, "prefill", None)
    return (run(cache, ids) if run is not None else backend.forward(cache, ids))[0]


def decode_one_token(backend, cache, token: int) -> np.ndarray:
    """Append one token at the cache position; logits for the next one [vocab]."""
    return backend.forward(cache, np.array([[token]], dtype=np.int64))[0]


class TokenStream:
    """Per-request decoding state: logits -> sampled token -> text delta, EOS / stop / length checks.

    Shared by the single-request loop below and the batch scheduler (engine/scheduler.py), so both
    sample, stop and stream identically.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], params: SamplingParams, eos_ids: Sequence[int],
                 state: GenerationState, grammar=None):
        self.prompt_ids, self.params, self.state = list(prompt_ids), params, state
        # structured output (engine/structured.py): a CompiledGrammar -> this request's own matcher
        self.grammar = grammar.start() if grammar is not None else None
        self.rng = make_rng(params.seed)
        self.detok = IncrementalDetokenizer(tokenizer, self.prompt_ids)
        self.stopper = StopStringMatcher(params.stop)
        self.eos = frozenset(int(e) for e in eos_ids)
        self.eos_list = sorted(self.eos)
        self.done = False

    def prepare(self) -> None:
        """Call before the forward pass that produces this request's next logits: a constrained request
        starts computing its allowed-token mask in a worker thread meanwhile."""
        if self.grammar is not None and not self.done:
            self.grammar.prepare()

    def sample(self, logits: np.ndarray) -> int:
        """logits [vocab] of the next position -> token id (within the grammar's mask, if constrained)."""
        st = self.state
        raw = logits
        logits = process_logits(logits, self.params, st.tokens, self.prompt_ids, self.eos_list, len(st.tokens))
        if self.grammar is not None:
            logits = self.grammar.mask_logits(logits, fallback=raw if logits is not raw else None)
        token = sample_token(logits, self.params, self.rng)
        if st.t_first is None:
            st.t_first = time.perf_counter()
        return token

    def accept(self, token: int) -> str:
        """Record ``token``; return the text that became final. Sets ``done`` when generation ends
        (EOS, stop string, max_new_tokens); the token is then not fed to the model."""
        st = self.state
        if token in self.eos:
            st.finish_reason = "stop"
            return self._finish()
        if self.grammar is not None:
            self.grammar.consume(token)
        st.tokens.append(token)
        delta, stopped = self.stopper.push(self.detok.push(token))
        if delta:
            st.text.append(delta)
        if stopped:
            st.finish_reason = "stop"
            self.done = True
            self.release()
        elif self.grammar is not None and self.grammar.is_stopped:  # complete: only EOS could follow
            st.finish_reason = "stop"
            delta += self._finish()
        elif len(st.tokens) >= self.params.max_new_tokens:
            st.finish_reason = "length"
            delta += self._finish()
        return delta

    def _finish(self) -> str:
        tail, stopped = self.stopper.push(self.detok.flush())
        tail += "" if stopped else self.stopper.flush()
        if stopped:
            self.state.finish_reason = "stop"
        self.done = True
        self.release()
        if tail:
            self.state.text.append(tail)
        return tail

    def cancel(self) -> None:
        self.state.finish_reason = "cancelled"
        self.done = True
        self.release()

    def release(self) -> None:
        """Free the grammar matcher (idempotent)."""
        if self.grammar is not None:
            self.grammar.close()
            self.grammar = None


def generate_events(backend, tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                    eos_ids: Sequence[int], *, cache=None, reuse_len: int = 0,
                    state: GenerationState | None = None, grammar=None) -> Iterator[str]:
    """Yield text deltas (valid UTF-8, stop strings withheld) until EOS, a stop string or max_new_tokens.

    ``cache`` may already hold the first ``reuse_len`` prompt tokens (prefix reuse); only the rest is
    prefilled. ``state`` (if given) receives tokens, text, timings and the finish reason. ``grammar`` (a
    CompiledGrammar of engine/structured.py) constrains the output.
    """
    prompt_ids = list(prompt_ids)
    check_context(len(prompt_ids), params.max_new_tokens, backend.context_length)
    st = state if state is not None else GenerationState(len(prompt_ids))
    st.prompt_len = len(prompt_ids)
    own_cache = cache is None
    if own_cache:
        cache = backend.new_cache(1, capacity=len(prompt_ids) + params.max_new_tokens)
    stream = TokenStream(tokenizer, prompt_ids, params, eos_ids, st, grammar)
    try:
        stream.prepare()
        logits = prefill(backend, cache, prompt_ids[reuse_len:])
        st.t_prefill = time.perf_counter()
        while True:
            token = stream.sample(logits)
            delta = stream.accept(token)
            if delta:
                yield delta
            if stream.done:
                return
            stream.prepare()
            logits = decode_one_token(backend, cache, token)
    except GeneratorExit:
        stream.cancel()
        raise
    finally:
        stream.release()
        if own_cache:
            cache.close()


def generate(backend, tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
             eos_ids: Sequence[int], **kwargs) -> Completion:
    state = GenerationState(len(prompt_ids))
    for _ in generate_events(backend, tokenizer, prompt_ids, params, eos_ids, state=state, **kwargs):
        pass
    return state.completion()
