"""The validation gate: an artifact is published only when its validation figures meet the thresholds of
its model kind and precision.

Decoders are compared with the fp32 PyTorch model of the same source on teacher-forced positions
(export/validate.py): top-1 agreement (the quantized graph's argmax equals PyTorch's) and the mean KL
divergence of PyTorch's distribution from the graph's. Encoders: the minimum cosine between the
graph's and sentence-transformers' embeddings. fp32 graphs have their own, stricter check in the
pipeline (decoders must reproduce PyTorch's greedy tokens exactly, encoders cosine >= 0.9999).

A model config may override a threshold (``validation = { int4 = { min_top1 = 0.5 } }``: the tiny random
test models, whose flat logits make top-1 fragile); ``--allow-low-fidelity`` publishes anyway and
marks the manifest (``validation.low_fidelity``), which ``tta-engine models`` shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tta_engine.errors import LowFidelityError

# kind -> precision -> threshold -> value ("min_*": the figure must be >=, "max_*": <=)
THRESHOLDS: dict[str, dict[str, dict[str, float]]] = {
    "causal_lm": {"fp16": {"min_top1": 0.97, "max_kl": 0.01},
                  "int8": {"min_top1": 0.85, "max_kl": 0.10},
                  "int4": {"min_top1": 0.90, "max_kl": 0.05}},
    "embedding": {"fp16": {"min_cosine": 0.999}, "int8": {"min_cosine": 0.999}},
}
# what an export aims for, above the gate: an int4 decoder that misses these with int8 activations is
# re-encoded with two-digit activations (export/activations.py) and kept if that is closer
TARGETS: dict[str, dict[str, dict[str, float]]] = {"causal_lm": {"int4": {"min_top1": 0.93, "max_kl": 0.02}}}
_FIGURE = {"min_top1": "top1_agreement", "max_kl": "mean_kl_divergence", "min_cosine": "min_cosine"}


def thresholds(kind: str, precision: str, overrides: Mapping[str, Mapping[str, float]] | None = None
               ) -> dict[str, float]:
    """The thresholds an artifact of ``kind`` at ``precision`` must meet (the config's overrides win)."""
    return {**THRESHOLDS.get(kind, {}).get(precision, {}), **dict((overrides or {}).get(precision, {}))}


def targets(kind: str, precision: str, overrides: Mapping[str, Mapping[str, float]] | None = None
            ) -> dict[str, float]:
    """gate.TARGETS for ``kind`` at ``precision``; a config that overrides a threshold overrides its target."""
    return {**TARGETS.get(kind, {}).get(precision, {}), **dict((overrides or {}).get(precision, {}))}


def failures(figures: Mapping[str, Any], limits: Mapping[str, float]) -> list[dict[str, Any]]:
    """What fails: [{"figure", "value", "threshold", "limit"}]; empty when every threshold is met."""
    out = []
    for name, limit in limits.items():
        figure = _FIGURE[name]
        value = figures.get(figure)
        ok = value is not None and (value >= limit if name.startswith("min_") else value <= limit)
        if not ok:
            out.append({"figure": figure, "value": value, "threshold": name, "limit": limit})
    return out


def describe(failed: list[dict[str, Any]]) -> str:
    return ", ".join(f"{f['figure']} {f['value']} {'<' if f['threshold'].startswith('min_') else '>'} "
                     f"{f['limit']}" for f in failed)


def check(name: str, kind: str, validated: Mapping[str, Mapping[str, Any]],
          overrides: Mapping[str, Mapping[str, float]] | None, allow: bool) -> dict[str, dict]:
    """Gate every precision of one export: ``validated`` is {precision: figures}. Returns {precision:
    {"failed": [...], "thresholds": {...}}} for the precisions that failed (published only with ``allow``);
    raises :class:`LowFidelityError` naming every failed figure when any failed and ``allow`` is false."""
    failed = {}
    for precision, figures in validated.items():
        limits = thresholds(kind, precision, overrides)
        bad = failures(figures, limits)
        if bad:
            failed[precision] = {"failed": bad, "thresholds": limits}
    if failed and not allow:
        lines = "; ".join(f"{p}: {describe(f['failed'])}" for p, f in failed.items())
        raise LowFidelityError(
            f"{name}: the export's validation figures fall below the thresholds ({lines}); nothing was "
            "published. The quantized graph does not reproduce the model closely enough: try another "
            "precision (int8, fp16), or pass --allow-low-fidelity (allow_low_fidelity=True) to publish it "
            "marked as low fidelity.", failed)
    return failed
