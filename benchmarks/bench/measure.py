"""Timing: medians and ratios over samples, and the decode, context-length and embedding measurements
(engines run in alternating order after a warm-up)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .engines import EmbEngine, LMEngine, RunSample
from .prompts import SINGLE_QUERY, long_prompt_ids


def median(xs: Iterable[float]) -> float | None:
    vals = [float(x) for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def summarize(xs: Iterable[float]) -> dict[str, Any]:
    vals = [float(x) for x in xs if x is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "samples": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals),
            "samples": [round(v, 6) for v in vals]}


def ratio(numerator: Iterable[float], denominator: Iterable[float]) -> float | None:
    """median(numerator) / median(denominator); None when either side has no samples (or is 0)."""
    a, b = median(numerator), median(denominator)
    if a is None or not b:
        return None
    return a / b


def interleaved_halves(samples: Sequence[float]) -> tuple[list[float], list[float]]:
    """Even- and odd-indexed samples: two measurements of the same thing, for self-comparisons."""
    return list(samples[0::2]), list(samples[1::2])



def alternating(items: Sequence, rep: int) -> list:
    return list(items) if rep % 2 == 0 else list(items)[::-1]


def measure_decode(engines: Sequence[LMEngine], ids: Sequence[int], new_tokens: int, reps: int, *,
                   warmup_tokens: int = 16, pause_s: float = 0.2,
                   log: Callable[[str], None] = print) -> dict[str, list[RunSample]]:
    """Warm up each engine, then ``reps`` runs per engine in alternating order. Failing engines are dropped."""
    samples: dict[str, list[RunSample]] = {e.key: [] for e in engines}
    live = []
    for e in engines:
        try:
            e.run(ids, max(2, min(warmup_tokens, new_tokens)))
            live.append(e)
        except Exception as exc:  # noqa: BLE001
            log(f"  {e.key}: warm-up failed ({type(exc).__name__}: {exc}); dropped")
            e.error = f"{type(exc).__name__}: {exc}"
            samples.pop(e.key)
    for rep in range(reps):
        for e in alternating(live, rep):
            time.sleep(pause_s)
            s = e.run(ids, new_tokens)
            samples[e.key].append(s)
            log(f"  rep {rep + 1}/{reps} {e.key:18} TTFT {s.ttft_s * 1000:7.1f} ms  decode {s.decode_tok_s:7.1f} tok/s")
    return samples


def decode_summary(samples: Sequence[RunSample]) -> dict[str, Any]:
    return {"ttft_s": summarize(s.ttft_s for s in samples),
            "decode_tok_s": summarize(s.decode_tok_s for s in samples),
            "prefill_tok_s": summarize(s.prefill_tok_s for s in samples),
            "new_tokens": samples[0].n_tokens if samples else 0,
            "prompt_tokens": samples[0].prompt_tokens if samples else 0}


def measure_context(engines: Sequence[LMEngine], tokenizer, lengths: Sequence[int], new_tokens: int, reps: int, *,
                    pause_s: float = 0.2, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Prefill and decode tok/s at each prompt length (running text), per engine."""
    out: dict[str, dict[str, Any]] = {e.key: {} for e in engines}
    for i, length in enumerate(lengths):
        ids = long_prompt_ids(tokenizer, length)
        fit = [e for e in engines if length + new_tokens <= e.context_length]
        runs: dict[str, list[RunSample]] = {e.key: [] for e in fit}
        if i == 0:  # warm-up on this kind of prompt (the decode comparison warmed up on the chat prompt)
            for e in fit:
                try:
                    e.run(ids, 2)
                except Exception:  # noqa: BLE001 - reported by the measured run below
                    pass
        for rep in range(reps):
            for e in alternating(fit, rep):
                time.sleep(pause_s)
                try:
                    runs[e.key].append(e.run(ids, new_tokens))
                except Exception as exc:  # noqa: BLE001
                    log(f"  {e.key} @ {length}: {type(exc).__name__}: {exc}")
        for key, rs in runs.items():
            if rs:
                out[key][str(length)] = {"decode_tok_s": median(r.decode_tok_s for r in rs),
                                         "prefill_tok_s": median(r.prefill_tok_s for r in rs),
                                         "ttft_s": median(r.ttft_s for r in rs)}
        log("  context " + str(length) + ": " + ", ".join(
            f"{k} {v[str(length)]['decode_tok_s']:.1f} tok/s" for k, v in out.items() if str(length) in v))
    return out


def measure_embed(engines: Sequence[EmbEngine], corpus: list[str], batch_size: int, reps: int, single_reps: int,
                  *, reference_key: str | None = "st-torch", pause_s: float = 0.1,
                  log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """sentences/s over ``corpus`` (alternating order), single-query latency (blocks of queries per engine,
    two rounds in alternating order), and cosine vs the reference engine's embeddings."""
    import numpy as np

    vecs = {}
    for e in engines:  # warm-up, and the vectors for the cosine check
        e.encode(corpus[:batch_size], batch_size)
        e.encode([SINGLE_QUERY], 1)
        vecs[e.key] = np.asarray(e.encode(corpus, batch_size), dtype=np.float64)
    speed: dict[str, list[float]] = {e.key: [] for e in engines}
    for rep in range(reps):
        for e in alternating(engines, rep):
            time.sleep(pause_s)
            t0 = time.perf_counter()
            e.encode(corpus, batch_size)
            speed[e.key].append(len(corpus) / (time.perf_counter() - t0))
    # Single queries in blocks per engine (two rounds, order alternated): interleaving engines query by
    # query would charge each engine the wake-up of its thread pool after another engine ran.
    single: dict[str, list[float]] = {e.key: [] for e in engines}
    per_block = max(1, single_reps // 2)
    for rep in range(2):
        for e in alternating(engines, rep):
            time.sleep(pause_s)
            e.encode([SINGLE_QUERY], 1)
            for _ in range(per_block):
                t0 = time.perf_counter()
                e.encode([SINGLE_QUERY], 1)
                single[e.key].append(time.perf_counter() - t0)
    ref = vecs.get(reference_key) if reference_key else None
    out = {}
    for e in engines:
        rec = {"sentences_s": summarize(speed[e.key]), "single_query_s": summarize(single[e.key]),
               "sentences": len(corpus), "batch_size": batch_size}
        if ref is not None:
            v = vecs[e.key]
            cos = (v * ref).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(ref, axis=1))
            rec.update(min_cosine=round(float(cos.min()), 7), mean_cosine=round(float(cos.mean()), 7))
        out[e.key] = rec
        log(f"  {e.key:14} {rec['sentences_s']['median']:8.1f} sentences/s  single query "
            f"{rec['single_query_s']['median'] * 1000:6.2f} ms  min cosine {rec.get('min_cosine')}")
    return out
