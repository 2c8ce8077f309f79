"""The issue's figures (each a ratio of one engine's metric to a baseline's) computed from samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .measure import median, ratio


@dataclass(frozen=True)
class Target:
    """One figure the issue asks for: ``metric`` of ``engine`` ÷ the same metric of ``baseline``."""

    name: str
    section: str  # "decode" | "embed"
    metric: str
    engine: str
    baseline: str | None  # None: the metric itself, not a ratio
    op: str | None  # ">=" | "<=" | None (information only)
    threshold: float | None


TARGETS: tuple[Target, ...] = (
    Target("decode tok/s: tta int4 ÷ Optimum int8", "decode", "decode_tok_s", "tta-int4", "optimum-int8", ">=", 2.5),
    Target("decode tok/s: tta int4 ÷ PyTorch fp32", "decode", "decode_tok_s", "tta-int4", "torch-fp32", ">=", 6.0),
    Target("TTFT: tta int4 ÷ Optimum int8", "decode", "ttft_s", "tta-int4", "optimum-int8", "<=", 0.8),
    Target("decode tok/s: tta int8 ÷ Optimum int8", "decode", "decode_tok_s", "tta-int8", "optimum-int8", None, None),
    Target("decode tok/s: tta fp32 ÷ Optimum fp32", "decode", "decode_tok_s", "tta-fp32", "optimum-fp32", None, None),
    Target("decode tok/s: tta int4 ÷ llama.cpp (GGUF)", "decode", "decode_tok_s", "tta-int4", "llama.cpp", None, None),
    Target("TTFT: tta int4 ÷ llama.cpp (GGUF)", "decode", "ttft_s", "tta-int4", "llama.cpp", None, None),
    Target("sentences/s: tta fp32 ÷ sentence-transformers ONNX", "embed", "sentences_s", "tta-fp32", "st-onnx", ">=", 1.5),
    Target("cosine vs sentence-transformers: tta fp32 (min)", "embed", "min_cosine", "tta-fp32", None, ">=", 0.9999),
    Target("sentences/s: tta int8 ÷ sentence-transformers ONNX", "embed", "sentences_s", "tta-int8", "st-onnx", None, None),
    Target("sentences/s: tta int8 ÷ sentence-transformers ONNX int8", "embed", "sentences_s", "tta-int8", "st-onnx-int8", None, None),
    Target("cosine vs sentence-transformers: tta int8 (min)", "embed", "min_cosine", "tta-int8", None, ">=", 0.999),
    Target("single-query latency: tta fp32 ÷ sentence-transformers ONNX", "embed", "single_query_s", "tta-fp32", "st-onnx", None, None),
)


def _samples(section: dict[str, dict[str, Any]], engine: str, metric: str) -> list[float]:
    rec = section.get(engine) or {}
    val = rec.get(metric)
    if isinstance(val, dict):
        return list(val.get("samples") or ([] if val.get("median") is None else [val["median"]]))
    if isinstance(val, (list, tuple)):
        return list(val)
    return [] if val is None else [val]


def target_ratios(decode: dict[str, dict[str, Any]] | None, embed: dict[str, dict[str, Any]] | None,
                  targets: Sequence[Target] = TARGETS) -> list[dict[str, Any]]:
    """The issue's figures from per-engine samples: ``{engine: {metric: samples | summary}}`` per section.

    Returns one row per target; ``value`` is None (and ``ok`` None) when an engine was not measured.
    """
    rows = []
    for t in targets:
        section = decode if t.section == "decode" else embed
        if section is None:  # that kind of model was not benchmarked
            continue
        num = _samples(section, t.engine, t.metric)
        value = median(num) if t.baseline is None else ratio(num, _samples(section, t.baseline, t.metric))
        ok = None
        if value is not None and t.op is not None:
            ok = value >= t.threshold if t.op == ">=" else value <= t.threshold
        rows.append({"name": t.name, "engine": t.engine, "baseline": t.baseline, "metric": t.metric,
                     "value": value, "target": None if t.op is None else f"{t.op} {t.threshold:g}", "ok": ok})
    return rows
