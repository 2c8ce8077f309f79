"""Task-based model selection (the design note's ``select_model_for_task``), ranking and fallback chains.

Rules, in the order they are applied:

Filters (a model failing one is rejected, and the reason is kept for the error message):

- **task**: a causal LM serves a task when its ``task_mapping`` marks it suitable (``true`` or
  ``{suitable = true, ...}``); it never serves ``"embedding"``. An embedding model serves ``"embedding"``
  (unless its task_mapping says ``embedding = false``) and never a *text task* -- a task that any causal
  LM's task_mapping mentions. (A task that only embedding models list, e.g. ``semantic_search``, is served
  by the embedding models that mark it suitable.)
- **content_length** (tokens expected: prompt + output) must be <= ``context_length``. A model whose
  ``context_length`` is unknown (None) is *kept* but ranked after every model known to fit.
- **structured_output=True** requires ``cfg.structured_output`` or ``task_mapping["structured_output"]``
  marked suitable.
- **memory_budget_bytes**: ``cfg.memory_bytes`` must be <= the budget. Unknown ``memory_bytes`` is kept but
  ranked after models known to fit (same rule as an unknown context length).

Ranking of the survivors (best first), lexicographic:

1. number of imposed constraints that could not be checked (unknown context / memory) -- fewer first;
2. the task's ``quality_score`` (``prefer="quality"``) or ``speed_score`` (``prefer="speed"``), higher first
   (the boolean form of task_mapping means ``quality_score = speed_score = 0.5``);
3. measured speed from ``stats[name]["tokens_per_s"]`` (the manager's ``stats()``), faster first; a model
   with a measurement ranks before one without;
4. the other score (speed_score when preferring quality and vice versa), higher first;
5. fallback depth: a model that other models list (directly or transitively) as a fallback ranks after
   them -- a fallback is a lesser substitute for the model that names it. This is what makes
   ``phi-4-mini-instruct`` (whose fallbacks are gemma-3-1b-it and smollm2) the first choice for
   narrative_generation in the packaged configs, where both are plain ``true``;
6. the model name, so that the order is always deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any

from .config import ModelConfig, TaskSuitability, coerce_configs
from .errors import NoCapableModelError, UnknownModelError

EMBEDDING_TASK = "embedding"
PREFERENCES = ("quality", "speed")
_DEFAULT_SUITABILITY = TaskSuitability(suitable=True)


@dataclass(frozen=True)
class _Assessment:
    name: str
    reason: str | None  # None: capable
    unknown: int = 0  # imposed constraints that could not be checked
    suitability: TaskSuitability = _DEFAULT_SUITABILITY


def known_tasks(model_configs: Mapping[str, ModelConfig]) -> list[str]:
    """Every task some model's task_mapping mentions, plus ``"embedding"``; sorted."""
    tasks = {EMBEDDING_TASK}
    for cfg in model_configs.values():
        tasks.update(cfg.task_mapping)
    return sorted(tasks)


def _text_tasks(configs: Mapping[str, ModelConfig]) -> set[str]:
    return {t for cfg in configs.values() if not cfg.is_embedding for t in cfg.task_mapping}


def _check_args(task_type: str, content_length: int | None, memory_budget_bytes: int | None,
                prefer: str) -> None:
    if not isinstance(task_type, str) or not task_type:
        raise ValueError(f"task_type must be a non-empty string, got {task_type!r}")
    if prefer not in PREFERENCES:
        raise ValueError(f"prefer must be one of {PREFERENCES}, got {prefer!r}")
    for label, value in (("content_length", content_length), ("memory_budget_bytes", memory_budget_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{label} must be None or an integer >= 0, got {value!r}")


def _assess(cfg: ModelConfig, task: str, text_tasks: set[str], content_length: int | None,
            structured_output: bool, memory_budget_bytes: int | None) -> _Assessment:
    name, tm = cfg.name, cfg.task_mapping
    # -- task --
    if task == EMBEDDING_TASK:
        if not cfg.is_embedding:
            return _Assessment(name, f"is a {cfg.model_type} model; only embedding models serve 'embedding'")
        suit = tm.get(EMBEDDING_TASK, _DEFAULT_SUITABILITY)
        if not suit.suitable:
            return _Assessment(name, "task_mapping marks 'embedding' unsuitable")
    else:
        if cfg.is_embedding and task in text_tasks:
            return _Assessment(name, f"is an embedding model; it cannot serve the text task {task!r}")
        suit = tm.get(task)
        if suit is None:
            return _Assessment(name, f"task_mapping has no entry for {task!r}")
        if not suit.suitable:
            return _Assessment(name, f"task_mapping marks {task!r} unsuitable")
    # -- constraints --
    unknown = 0
    if content_length is not None:
        if cfg.context_length is None:
            unknown += 1
        elif content_length > cfg.context_length:
            return _Assessment(name, f"context_length {cfg.context_length} < content_length {content_length}")
    if structured_output:
        so = tm.get("structured_output")
        if not (cfg.structured_output or (so is not None and so.suitable)):
            return _Assessment(name, "does not support structured output (structured_output = false)")
    if memory_budget_bytes is not None:
        if cfg.memory_bytes is None:
            unknown += 1
        elif cfg.memory_bytes > memory_budget_bytes:
            return _Assessment(name, f"memory_bytes {cfg.memory_bytes} > memory_budget_bytes {memory_budget_bytes}")
    return _Assessment(name, None, unknown, suit)


def _tokens_per_s(stats: Mapping[str, Any] | None, name: str) -> float | None:
    if not stats:
        return None
    entry = stats.get(name)
    if not isinstance(entry, Mapping):
        return None
    for key in ("tokens_per_s", "decode_tokens_per_s"):
        value = entry.get(key)
        if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return float(value)
    return None


def _fallback_depth(configs: Mapping[str, ModelConfig]) -> dict[str, int]:
    """For each model, how many *other* models reach it through their fallbacks (transitively)."""
    depth = dict.fromkeys(configs, 0)
    for root in configs:
        seen, todo = {root}, list(configs[root].fallbacks)
        while todo:
            nxt = todo.pop()
            if nxt in seen or nxt not in configs:
                continue
            seen.add(nxt)
            depth[nxt] += 1
            todo.extend(configs[nxt].fallbacks)
    return depth


def _constraints_text(content_length, structured_output, memory_budget_bytes) -> str:
    parts = []
    if content_length is not None:
        parts.append(f"content_length={content_length}")
    if structured_output:
        parts.append("structured_output=True")
    if memory_budget_bytes is not None:
        parts.append(f"memory_budget_bytes={memory_budget_bytes}")
    return ", ".join(parts) or "none"


def rank_models_for_task(task_type: str, model_configs: Mapping[str, Any] | None,
                         content_length: int | None = None, structured_output: bool = False, *,
                         stats: Mapping[str, Mapping] | None = None, memory_budget_bytes: int | None = None,
                         prefer: str = "quality") -> list[str]:
    """Every model able to serve ``task_type`` under the constraints, best first (see the module doc).

    Never returns an empty list: raises :class:`NoCapableModelError` for an unknown task (naming the known
    tasks) or when no model passes the filters (naming the task, the constraints and, for every model,
    why it was rejected).
    """
    _check_args(task_type, content_length, memory_budget_bytes, prefer)
    configs = coerce_configs(model_configs)
    tasks = known_tasks(configs)
    if task_type not in tasks:
        raise NoCapableModelError(
            f"unknown task {task_type!r}: no model's task_mapping mentions it. Known tasks: {', '.join(tasks)}. "
            "Add the task to a model's task_mapping (configs/models.toml) or use one of these."
        )
    text_tasks = _text_tasks(configs)
    assessed = [_assess(cfg, task_type, text_tasks, content_length, structured_output, memory_budget_bytes)
                for cfg in configs.values()]
    capable = [a for a in assessed if a.reason is None]
    if not capable:
        rejected = "\n".join(f"  - {a.name}: {a.reason}" for a in sorted(assessed, key=lambda a: a.name))
        raise NoCapableModelError(
            f"no configured model can serve task {task_type!r} under constraints "
            f"({_constraints_text(content_length, structured_output, memory_budget_bytes)}). "
            f"Candidates and why each was rejected:\n{rejected or '  (no models configured)'}"
        )
    depth = _fallback_depth(configs)

    def key(a: _Assessment):
        primary, other = ((a.suitability.quality_score, a.suitability.speed_score) if prefer == "quality"
                          else (a.suitability.speed_score, a.suitability.quality_score))
        tps = _tokens_per_s(stats, a.name)
        return (a.unknown, -primary, tps is None, -(tps or 0.0), -other, depth[a.name], a.name)

    return [a.name for a in sorted(capable, key=key)]


def select_model_for_task(task_type: str, model_configs: Mapping[str, Any] | None,
                          content_length: int | None = None, structured_output: bool = False, *,
                          stats: Mapping[str, Mapping] | None = None, memory_budget_bytes: int | None = None,
                          prefer: str = "quality") -> str:
    """The name of the best model for ``task_type`` (the first of :func:`rank_models_for_task`).

    ``model_configs``: ``{name: ModelConfig}``, the design note's ``{name: dict}``, or None for the packaged
    configs. Raises :class:`NoCapableModelError` when the task is unknown or no model can serve it.
    """
    return rank_models_for_task(task_type, model_configs, content_length, structured_output, stats=stats,
                                memory_budget_bytes=memory_budget_bytes, prefer=prefer)[0]


def resolve_fallback_chain(name: str, model_configs: Mapping[str, Any] | None, task_type: str | None = None,
                           content_length: int | None = None, structured_output: bool = False, *,
                           memory_budget_bytes: int | None = None) -> list[str]:
    """``name`` followed by its fallbacks that can serve ``task_type`` under the constraints.

    Breadth-first over ``fallbacks`` (a model's own list, in its order, before the fallbacks' fallbacks),
    each model at most once, so cycles terminate. ``name`` itself always comes first (the caller chose
    it). A fallback that cannot serve the task is skipped, but its own fallbacks are still followed.
    ``task_type=None`` keeps every fallback. Raises :class:`UnknownModelError` for ``name`` or a fallback
    that no config defines.
    """
    configs = coerce_configs(model_configs)
    if name not in configs:
        raise UnknownModelError(name, list(configs))
    if task_type is not None:
        _check_args(task_type, content_length, memory_budget_bytes, "quality")
    text_tasks = _text_tasks(configs)
    chain, seen, queue = [name], {name}, list(configs[name].fallbacks)
    while queue:
        fb = queue.pop(0)
        if fb in seen:
            continue
        seen.add(fb)
        if fb not in configs:
            raise UnknownModelError(fb, list(configs))
        cfg = configs[fb]
        if task_type is None or _assess(cfg, task_type, text_tasks, content_length, structured_output,
                                        memory_budget_bytes).reason is None:
            chain.append(fb)
        queue.extend(cfg.fallbacks)
    return chain
