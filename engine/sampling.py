"""Sampling as pure functions over numpy logits (in the style of gpt-fast and llama-cpp-python).

``SamplingParams`` is a frozen, validated dataclass; ``process_logits`` applies the repetition penalty and the
``min_new_tokens`` EOS mask; ``sample_token`` draws one token id: greedy (argmax) when temperature is 0, else
temperature -> top-k -> top-p (nucleus) -> one inverse-CDF draw from a ``numpy.random.Generator``, so the same
seed always gives the same sequence of tokens. Nothing here mutates its inputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np

from .errors import SamplingParamError

# Names used by the design note / the game / OpenAI-style APIs, mapped onto SamplingParams fields.
ALIASES = {"max_tokens": "max_new_tokens", "stop_sequences": "stop"}
_FIRST_NUCLEUS = 64  # candidates examined first by top-p before widening the search


def _bad(name: str, value: Any, allowed: str) -> SamplingParamError:
    return SamplingParamError(f"invalid sampling parameter {name}={value!r}; allowed: {allowed}")


def _as_int(name: str, value: Any, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise _bad(name, value, allowed)
    return int(value)


def _as_float(name: str, value: Any, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise _bad(name, value, allowed)
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 means greedy (argmax), never "use the default"
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 = disabled
    repetition_penalty: float = 1.0  # > 0, HF semantics; 1 = disabled
    min_new_tokens: int = 0  # EOS is masked out until this many tokens were generated
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "max_new_tokens", _as_int("max_new_tokens", self.max_new_tokens, "an integer >= 1"))
        if self.max_new_tokens < 1:
            raise _bad("max_new_tokens", self.max_new_tokens, "an integer >= 1")
        t = _as_float("temperature", self.temperature, "a finite number >= 0 (0 = greedy)")
        if t < 0:
            raise _bad("temperature", t, "a finite number >= 0 (0 = greedy)")
        put(self, "temperature", t)
        p = _as_float("top_p", self.top_p, "a number in (0, 1]")
        if not 0.0 < p <= 1.0:
            raise _bad("top_p", p, "a number in (0, 1]")
        put(self, "top_p", p)
        put(self, "top_k", _as_int("top_k", self.top_k, "an integer >= 0 (0 = disabled)"))
        if self.top_k < 0:
            raise _bad("top_k", self.top_k, "an integer >= 0 (0 = disabled)")
        rp = _as_float("repetition_penalty", self.repetition_penalty, "a finite number > 0 (1 = disabled)")
        if rp <= 0:
            raise _bad("repetition_penalty", rp, "a finite number > 0 (1 = disabled)")
        put(self, "repetition_penalty", rp)
        allowed = f"an integer in [0, max_new_tokens={self.max_new_tokens}]"
        put(self, "min_new_tokens", _as_int("min_new_tokens", self.min_new_tokens, allowed))
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise _bad("min_new_tokens", self.min_new_tokens, allowed)
        if self.seed is not None:
            put(self, "seed", _as_int("seed", self.seed, "None or an integer >= 0"))
            if self.seed < 0:
                raise _bad("seed", self.seed, "None or an integer >= 0")
        stop = self.stop
        if isinstance(stop, str):  # a single stop string, as llama-cpp-python accepts
            stop = (stop,)
        if not isinstance(stop, (list, tuple)):
            raise _bad("stop", stop, "a list or tuple of non-empty strings")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise _bad("stop", s, "each stop string must be a non-empty str")
        put(self, "stop", tuple(stop))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def params_from_kwargs(defaults: SamplingParams | None = None, **kwargs: Any) -> SamplingParams:
    """SamplingParams from keyword arguments over ``defaults``; accepts ``max_tokens`` and ``stop_sequences``.

    A value of None means "not given" (the default is kept), except for ``seed`` where None means "random".
    Unknown names raise SamplingParamError naming them.
    """
    base = defaults if defaults is not None else SamplingParams()
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = sorted(k for k in kwargs if k not in fields and k not in ALIASES)
    if unknown:
        raise SamplingParamError(
            f"unknown sampling parameter(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(fields | set(ALIASES)))}"
        )
    changes: dict[str, Any] = {}
    for key, value in kwargs.items():
        name = ALIASES.get(key, key)
        if value is None and name != "seed":
            continue
        if name in changes and changes[name] != value:
            raise SamplingParamError(
                f"sampling parameter {name} given twice with different values ({changes[name]!r}, {value!r})"
            )
        changes[name] = value
    return dataclasses.replace(base, **changes)


def make_rng(seed: int | None = None) -> np.random.Generator:
    """A numpy Generator; the same seed gives the same draws, None gives fresh OS entropy."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0):
        raise _bad("seed", seed, "None or an integer >= 0")
    return np.random.default_rng(None if seed is None else int(seed))


def apply_repetition_penalty(logits: np.ndarray, token_ids: Sequence[int] | np.ndarray,
                             penalty: float) -> np.ndarray:
    """HF semantics: over the distinct ``token_ids``, divide positive logits and multiply negative ones."""
    if isinstance(penalty, bool) or not isinstance(penalty, Real) or not penalty > 0:
        raise _bad("repetition_penalty", penalty, "a finite number > 0 (1 = disabled)")
    out = np.array(logits, copy=True)
    ids = np.unique(np.asarray(token_ids, dtype=np.int64).ravel())
    if penalty == 1.0 or ids.size == 0:
        return out
    if ids[0] < 0 or ids[-1] >= out.shape[-1]:
        raise SamplingParamError(f"token id out of range for a vocabulary of {out.shape[-1]}: "
                                 f"{int(ids[0]) if ids[0] < 0 else int(ids[-1])}")
    vals = out[..., ids]
    out[..., ids] = np.where(vals < 0, vals * penalty, vals / penalty)
    return out


def process_logits(logits: np.ndarray, params: SamplingParams, generated_ids: Sequence[int] | np.ndarray = (),
                   prompt_ids: Sequence[int] | np.ndarray | None = None, eos_ids: Sequence[int] = (),
                   n_generated: int | None = None) -> np.ndarray:
    """Repetition penalty (over prompt + generated ids) and EOS masking while fewer than min_new_tokens.

    Returns ``logits`` itself when there is nothing to do, else a new array.
    """
    out = logits
    if params.repetition_penalty != 1.0:
        gen = np.asarray(generated_ids, dtype=np.int64).ravel()
        ids = gen if prompt_ids is None else np.concatenate([np.asarray(prompt_ids, dtype=np.int64).ravel(), gen])
        out = apply_repetition_penalty(out, ids, params.repetition_penalty)
    n = len(generated_ids) if n_generated is None else n_generated
    eos = [int(e) for e in eos_ids]
    if eos and n < params.min_new_tokens:
        if out is logits:
            out = np.array(logits, copy=True)
        out[..., eos] = -np.inf
    return out


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices (into probs, most probable first) of the smallest set whose total probability is >= top_p.

    Looks at the top 64 candidates first and widens only when they do not reach top_p, so a peaked
    distribution over a large vocabulary is never fully sorted. Ties go to the lower index.
    """
    n = probs.size
    m = min(n, _FIRST_NUCLEUS)
    while True:
        idx = np.arange(n) if m >= n else np.sort(np.argpartition(probs, n - m)[n - m:])
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        cum = np.cumsum(probs[idx])
        if cum[-1] >= top_p or m >= n:
            cut = int(np.searchsorted(cum, top_p, side="left"))
            return idx[: min(cut, m - 1) + 1]
        m = min(n, m * 8)


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from 1-D logits: argmax when greedy (first index on ties), else a seeded draw."""
    x = np.asarray(logits)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"sample_token expects 1-D non-empty logits, got shape {x.shape}")
    if params.is_greedy or params.top_k == 1:
        return int(np.argmax(x))
    z = x.astype(np.float64)
    z /= params.temperature
    cand: np.ndarray | None = None
    k, n = params.top_k, z.size
    if 0 < k < n:
        cand = np.sort(np.argpartition(z, n - k)[n - k:])
        z = z[cand]
    zmax = z.max()
    if not np.isfinite(zmax):  # all masked, +inf or NaN: nothing to sample from
        return int(np.argmax(x))
    if np.isneginf(z.min()):  # masked (structured output): sample among the others only; exp() of -inf
        keep = np.flatnonzero(z != -np.inf)  # lanes leaves numpy's SIMD path (4x slower over a vocab)
        z = z[keep]
        cand = keep if cand is None else cand[keep]
    np.subtract(z, zmax, out=z)
    probs = np.exp(z, out=z)  # z is our own copy: no further vocab-sized allocation
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = _nucleus(probs, params.top_p)
        probs = probs[keep]
        cand = keep if cand is None else cand[keep]
    cum = np.cumsum(probs)
    i = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), cum.size - 1)
    if probs[i] <= 0.0:  # only reachable through rounding at the very end of the CDF
        i = int(np.flatnonzero(probs > 0)[-1])
    return int(i if cand is None else cand[i])


def sample_batch(logits: np.ndarray, params: SamplingParams | Sequence[SamplingParams],
                 rngs: np.random.Generator | Sequence[np.random.Generator]) -> np.ndarray:
    """Token ids [batch] (int64) from logits [batch, vocab]; params and rngs may be one or one per row.

    Rows are independent: row b uses params[b] and rngs[b] exactly as ``sample_token`` would.
    """
    x = np.asarray(logits)
    if x.ndim != 2:
        raise ValueError(f"sample_batch expects logits [batch, vocab], got shape {x.shape}")
    b = x.shape[0]
    plist = [params] * b if isinstance(params, SamplingParams) else list(params)
    glist = [rngs] * b if isinstance(rngs, np.random.Generator) else list(rngs)
    if len(plist) != b or len(glist) != b:
        raise ValueError(f"need one params and one rng per row: batch={b}, params={len(plist)}, rngs={len(glist)}")
    out = np.argmax(x, axis=-1).astype(np.int64)  # greedy rows are done
    for r in range(b):
        if not (plist[r].is_greedy or plist[r].top_k == 1):
            out[r] = sample_token(x[r], plist[r], glist[r])
    return out
