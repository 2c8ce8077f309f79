"""Task-based model selection: filters, ranking, stats, fallback chains and error messages."""

from __future__ import annotations

import pytest
from tta_engine.config import load_model_configs
from tta_engine.errors import NoCapableModelError, UnknownModelError
from tta_engine.selection import (
    known_tasks,
    rank_models_for_task,
    resolve_fallback_chain,
    select_model_for_task,
)

# The design note's dicts (boolean task_mapping, no context / memory information).
DESIGN_NOTE = {
    "phi-4-mini-instruct": {
        "model_id": "microsoft/phi-4-mini-instruct", "tokenizer_id": "microsoft/phi-4-mini-instruct",
        "model_type": "causal_lm", "quantization": "4bit", "max_tokens": 512, "temperature": 0.7,
        "supports_streaming": True,
        "task_mapping": {"narrative_generation": True, "tool_selection": True, "knowledge_reasoning": True,
                         "structured_output": False},
    },
    "gemma-3-1b-it": {
        "model_id": "google/gemma-3-1b-it", "tokenizer_id": "google/gemma-3-1b-it", "model_type": "causal_lm",
        "quantization": "4bit", "max_tokens": 1024, "temperature": 0.7, "supports_streaming": True,
        "task_mapping": {"narrative_generation": True, "tool_selection": False, "knowledge_reasoning": True,
                         "structured_output": True},
    },
    "all-MiniLM-L6-v2": {
        "model_id": "sentence-transformers/all-MiniLM-L6-v2", "model_type": "embedding", "quantization": None,
        "embedding_dimension": 384,
    },
}


def lm(tasks: dict, **extra) -> dict:
    raw = {"model_type": "causal_lm", "source": {"kind": "local", "path": "/nowhere"}, "task_mapping": tasks}
    raw.update(extra)
    return raw


def emb(**extra) -> dict:
    raw = {"model_type": "embedding", "source": {"kind": "local", "path": "/nowhere"}, "embedding_dimension": 8}
    raw.update(extra)
    return raw


def scored(q: float, s: float = 0.5, ok: bool = True) -> dict:
    return {"suitable": ok, "quality_score": q, "speed_score": s}


# --- task_mapping -------------------------------------------------------------------------------------

def test_design_note_dicts_boolean_task_mapping():
    assert select_model_for_task("tool_selection", DESIGN_NOTE) == "phi-4-mini-instruct"
    assert rank_models_for_task("narrative_generation", DESIGN_NOTE) == ["gemma-3-1b-it", "phi-4-mini-instruct"]
    assert select_model_for_task("narrative_generation", DESIGN_NOTE, structured_output=True) == "gemma-3-1b-it"
    assert select_model_for_task("embedding", DESIGN_NOTE) == "all-MiniLM-L6-v2"


def test_scored_task_mapping_ranks_by_quality_or_speed():
    cfgs = {"big": lm({"chat": scored(0.9, 0.2)}), "small": lm({"chat": scored(0.4, 0.9)}),
            "mid": lm({"chat": scored(0.6, 0.6)}), "off": lm({"chat": scored(1.0, 1.0, ok=False)})}
    assert rank_models_for_task("chat", cfgs) == ["big", "mid", "small"]
    assert rank_models_for_task("chat", cfgs, prefer="speed") == ["small", "mid", "big"]
    with pytest.raises(ValueError, match="prefer"):
        select_model_for_task("chat", cfgs, prefer="cheap")


def test_mixed_boolean_and_scored_forms():
    # true == {suitable = true, quality_score = 0.5, speed_score = 0.5}
    cfgs = {"a": lm({"chat": True}), "b": lm({"chat": scored(0.7)}), "c": lm({"chat": scored(0.3)})}
    assert rank_models_for_task("chat", cfgs) == ["b", "a", "c"]


def test_embedding_models_never_serve_text_tasks_and_only_they_serve_embedding():
    cfgs = {"e": emb(task_mapping={"chat": True}), "t": lm({"chat": scored(0.1), "embedding": True})}
    assert rank_models_for_task("chat", cfgs) == ["t"]
    assert rank_models_for_task("embedding", cfgs) == ["e"]
    # a task only embedding models mention is theirs
    cfgs = {"e": emb(task_mapping={"semantic_search": True}), "t": lm({"chat": True})}
    assert rank_models_for_task("semantic_search", cfgs) == ["e"]
    cfgs = {"e": emb(task_mapping={"embedding": False}), "f": emb()}
    assert rank_models_for_task("embedding", cfgs) == ["f"]


# --- constraints ----------------------------------------------------------------------------------------

def test_content_length_filters_and_unknown_context_ranks_after_known_fit():
    cfgs = {"short": lm({"chat": scored(0.9)}, context_length=2048),
            "long": lm({"chat": scored(0.5)}, context_length=32768),
            "unknown": lm({"chat": scored(0.99)})}
    assert select_model_for_task("chat", cfgs) == "unknown"  # no content_length: context does not matter
    assert rank_models_for_task("chat", cfgs, content_length=2048) == ["short", "long", "unknown"]
    assert rank_models_for_task("chat", cfgs, content_length=4000) == ["long", "unknown"]
    assert rank_models_for_task("chat", cfgs, content_length=100_000) == ["unknown"]
    with pytest.raises(NoCapableModelError) as ei:
        select_model_for_task("chat", {"short": cfgs["short"]}, content_length=4000)
    assert "context_length 2048 < content_length 4000" in str(ei.value)


def test_structured_output_requires_flag_or_task_mapping():
    cfgs = {"flag": lm({"chat": scored(0.2)}, structured_output=True),
            "mapped": lm({"chat": scored(0.3), "structured_output": True}),
            "mapped_off": lm({"chat": scored(0.9), "structured_output": False}),
            "plain": lm({"chat": scored(0.8)})}
    assert select_model_for_task("chat", cfgs) == "mapped_off"
    assert rank_models_for_task("chat", cfgs, structured_output=True) == ["mapped", "flag"]


def test_memory_budget():
    cfgs = {"big": lm({"chat": scored(0.9)}, memory_bytes=8 << 30),
            "small": lm({"chat": scored(0.5)}, memory_bytes=1 << 30),
            "unknown": lm({"chat": scored(0.7)})}
    assert rank_models_for_task("chat", cfgs) == ["big", "unknown", "small"]
    assert rank_models_for_task("chat", cfgs, memory_budget_bytes=2 << 30) == ["small", "unknown"]
    assert rank_models_for_task("chat", cfgs, memory_budget_bytes=8 << 30) == ["big", "small", "unknown"]
    with pytest.raises(NoCapableModelError, match=r"memory_bytes 1073741824 > memory_budget_bytes 1000"):
        select_model_for_task("chat", {"small": cfgs["small"]}, memory_budget_bytes=1000)


def test_bad_constraint_values_are_rejected():
    cfgs = {"a": lm({"chat": True})}
    for kw in ({"content_length": -1}, {"memory_budget_bytes": 1.5}, {"content_length": True}):
        with pytest.raises(ValueError):
            select_model_for_task("chat", cfgs, **kw)


# --- stats ------------------------------------------------------------------------------------------------

def test_stats_prefer_the_faster_of_equally_capable_models():
    cfgs = {"a": lm({"chat": scored(0.6)}), "b": lm({"chat": scored(0.6)}), "c": lm({"chat": scored(0.8)})}
    assert rank_models_for_task("chat", cfgs) == ["c", "a", "b"]  # name tie-break
    stats = {"a": {"tokens_per_s": 20.0, "requests": 3}, "b": {"tokens_per_s": 55.5}, "c": {"tokens_per_s": 1.0}}
    # stats never beat a better score, only break ties between equally capable models
    assert rank_models_for_task("chat", cfgs, stats=stats) == ["c", "b", "a"]
    # a measured model ranks before an unmeasured one; junk entries are ignored
    assert rank_models_for_task("chat", cfgs, stats={"b": {"tokens_per_s": 3.0}}) == ["c", "b", "a"]
    assert rank_models_for_task("chat", cfgs, stats={"b": {"tokens_per_s": "fast"}, "a": 7}) == ["c", "a", "b"]


def test_tie_break_is_deterministic_by_name():
    cfgs = {n: lm({"chat": True}) for n in ("zeta", "alpha", "mid")}
    assert rank_models_for_task("chat", cfgs) == ["alpha", "mid", "zeta"]
    assert rank_models_for_task("chat", dict(reversed(list(cfgs.items())))) == ["alpha", "mid", "zeta"]


def test_a_fallback_ranks_after_the_model_that_names_it():
    cfgs = {"a-fallback": lm({"chat": True}), "z-primary": lm({"chat": True}, fallbacks=["a-fallback"])}
    assert rank_models_for_task("chat", cfgs) == ["z-primary", "a-fallback"]


# --- fallbacks ----------------------------------------------------------------------------------------------

def test_fallback_chain_breadth_first_skips_incapable_and_survives_cycles():
    cfgs = {
        "a": lm({"chat": True}, fallbacks=["b", "c"]),
        "b": lm({"chat": False}, fallbacks=["d", "a"]),  # incapable, but its fallbacks are followed
        "c": lm({"chat": True}, fallbacks=["a", "c"]),
        "d": lm({"chat": True}, fallbacks=["b"]),
    }
    assert resolve_fallback_chain("a", cfgs, "chat") == ["a", "c", "d"]
    assert resolve_fallback_chain("a", cfgs) == ["a", "b", "c", "d"]
    assert resolve_fallback_chain("d", cfgs, "chat") == ["d", "a", "c"]
    cfgs["c"] = lm({"chat": True}, context_length=100, fallbacks=["a"])
    assert resolve_fallback_chain("a", cfgs, "chat", content_length=500) == ["a", "d"]


def test_fallback_chain_unknown_names():
    with pytest.raises(UnknownModelError, match="nope"):
        resolve_fallback_chain("nope", {"a": lm({"chat": True})}, "chat")
    with pytest.raises(UnknownModelError, match="ghost"):
        resolve_fallback_chain("a", {"a": lm({"chat": True}, fallbacks=["ghost"])}, "chat")


# --- errors -----------------------------------------------------------------------------------------------

def test_unknown_task_names_the_known_tasks():
    with pytest.raises(NoCapableModelError) as ei:
        select_model_for_task("dancing", DESIGN_NOTE)
    msg = str(ei.value)
    assert "unknown task 'dancing'" in msg
    for task in ("narrative_generation", "tool_selection", "knowledge_reasoning", "embedding"):
        assert task in msg
    assert known_tasks(load_model_configs()) == ["embedding", "knowledge_reasoning", "narrative_generation",
                                                 "structured_output", "tool_selection"]


def test_no_capable_model_names_task_constraints_and_each_candidate():
    with pytest.raises(NoCapableModelError) as ei:
        select_model_for_task("tool_selection", DESIGN_NOTE, structured_output=True, content_length=10)
    msg = str(ei.value)
    assert "'tool_selection'" in msg and "structured_output=True" in msg and "content_length=10" in msg
    assert "phi-4-mini-instruct: does not support structured output" in msg
    assert "gemma-3-1b-it: task_mapping marks 'tool_selection' unsuitable" in msg
    assert "all-MiniLM-L6-v2: is an embedding model" in msg
    assert isinstance(ei.value, LookupError)


# --- the packaged configs -------------------------------------------------------------------------------

def test_packaged_configs_map_sensibly():
    cfgs = load_model_configs()
    assert select_model_for_task("narrative_generation", cfgs) == "phi-4-mini-instruct"
    assert rank_models_for_task("narrative_generation", cfgs) == [
        "phi-4-mini-instruct", "gemma-3-1b-it", "smollm2-135m-instruct"]
    assert rank_models_for_task("tool_selection", cfgs) == ["phi-4-mini-instruct"]
    assert "phi-4-mini-instruct" not in rank_models_for_task("narrative_generation", cfgs, structured_output=True)
    assert select_model_for_task("knowledge_reasoning", cfgs, structured_output=True) == "gemma-3-1b-it"
    # the speed-scored embedded default wins when speed is preferred
    assert select_model_for_task("narrative_generation", cfgs, prefer="speed") == "smollm2-135m-instruct"
    # 100k tokens fit only phi-4-mini's 128k context
    assert rank_models_for_task("narrative_generation", cfgs, content_length=100_000) == ["phi-4-mini-instruct"]
    assert set(rank_models_for_task("embedding", cfgs)) == {"all-MiniLM-L6-v2", "all-minilm-l6-v2"}
    assert resolve_fallback_chain("phi-4-mini-instruct", cfgs, "narrative_generation") == [
        "phi-4-mini-instruct", "gemma-3-1b-it", "smollm2-135m-instruct"]
    assert resolve_fallback_chain("phi-4-mini-instruct", cfgs, "tool_selection") == ["phi-4-mini-instruct"]
    assert select_model_for_task("narrative_generation", None) == "phi-4-mini-instruct"  # None = packaged
