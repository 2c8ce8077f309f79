"""Structured output (engine/structured.py) on tiny random models: every constraint kind, the mask honoured
at every step (replayed through an independent matcher), typed compile errors, mixed batches,
cancellation, streaming, tool calls."""

from __future__ import annotations

import asyncio
import json
import re

import numpy as np
import pytest
from pydantic import BaseModel, Field
from tta_engine.errors import StructuredOutputError
from tta_engine.manager import TransformersModelManager
from tta_engine.structured import (
    JSON_OPTIONS,
    compile_for_model,
    ll_tokenizer,
    parse_tool_call,
    tool_call_format,
)

llguidance = pytest.importorskip("llguidance")
MSGS = [{"role": "user", "content": "The lantern flickers in the forest."}]


class Mood(BaseModel):
    mood: str = Field(pattern="^(calm|tense|happy)$")
    level: int = Field(ge=0, le=9)
    tags: list[str] = Field(max_length=2)
    note: str = Field(max_length=6)


SCHEMA = {"type": "object", "properties": {"kind": {"enum": ["tree", "river"]},
                                           "size": {"type": "integer", "minimum": 1, "maximum": 50},
                                           "name": {"type": "string", "maxLength": 5}},
          "required": ["kind", "size", "name"], "additionalProperties": False}
TOOLS = {"move": {"type": "object", "properties": {"to": {"enum": ["north", "south"]}}, "required": ["to"],
                  "additionalProperties": False},
         "rate": Mood}
FORMATS = {
    "pydantic": Mood,
    "schema": SCHEMA,
    "openai_json_schema": {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}},
    "regex": {"type": "regex", "pattern": r"[0-9]{3}-[a-z]{2,4}"},
    "choice": {"type": "choice", "choices": ["yes", "no", "maybe later"]},
    "lark": {"type": "grammar", "lark": 'start: "go " DIR (", " DIR)?\nDIR: "north" | "south" | "east"'},
    "tool": tool_call_format(TOOLS),
}
SAMPLING = [dict(temperature=0), dict(temperature=1.3, seed=5),
            dict(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.4, seed=11)]


def check_output(kind: str, text: str) -> None:
    if kind == "pydantic":
        Mood.model_validate_json(text)
    elif kind in ("schema", "openai_json_schema"):
        value = json.loads(text)
        assert value["kind"] in ("tree", "river") and 1 <= value["size"] <= 50 and len(value["name"]) <= 5
    elif kind == "regex":
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
    elif kind == "choice":
        assert text in ("yes", "no", "maybe later")
    elif kind == "lark":
        assert re.fullmatch(r"go (north|south|east)(, (north|south|east))?", text), text
    elif kind == "tool":
        call = parse_tool_call(text, TOOLS)
        assert call.name in TOOLS


@pytest.fixture(scope="module")
def tiny(artifacts, tiny_configs):
    """(LanguageModel, artifact path) of the tiny Llama."""
    from tta_engine.runtime import open_artifact_lm

    art = artifacts.get("tiny-llama", "fp32")
    model = open_artifact_lm(art, tiny_configs["tiny-llama"])
    yield model, art.path
    model.close()


@pytest.fixture()
def manager(artifacts, tiny_configs, tmp_path):
    artifacts.get("tiny-llama", "fp32")
    m = TransformersModelManager(tiny_configs, cache_dir=str(tmp_path / "cache"),
                                 artifacts_root=artifacts.root / "auto")
    yield m
    m.close()


def independent_matcher(path, vocab_size: int, rf):
    """A matcher built apart from the engine's bridge and grammar code: llguidance's own Transformers
    helper and grammar constructors."""
    from llguidance.hf import from_tokenizer
    from transformers import AutoTokenizer

    llt = from_tokenizer(AutoTokenizer.from_pretrained(path), n_vocab=vocab_size)
    M = llguidance.LLMatcher
    if isinstance(rf, type):
        grammar = M.grammar_from_json_schema(rf.model_json_schema(), defaults=JSON_OPTIONS)
    elif rf.get("type") == "json_schema":
        grammar = M.grammar_from_json_schema(rf["json_schema"]["schema"], defaults=JSON_OPTIONS)
    elif rf.get("type") == "regex":
        grammar = M.grammar_from_regex(rf["pattern"])
    elif rf.get("type") == "grammar":
        grammar = M.grammar_from_lark(rf["lark"])
    elif rf.get("type") == "choice":
        grammar = M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in rf["choices"]))
    else:
        grammar = M.grammar_from_json_schema(rf, defaults=JSON_OPTIONS)
    m = M(llt, grammar, log_level=0)
    assert not m.is_error(), m.get_error()
    return m


def replay(ref, tokens, vocab_size: int, eos_ids, finish_reason: str) -> None:
    """Every generated token was allowed by ``ref`` at its step; a finished output is accepted."""
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    mask = allocate_token_bitmask(1, vocab_size)
    for i, t in enumerate(tokens):
        assert t not in eos_ids, "EOS is never recorded as a token"
        fill_next_token_bitmask(ref, mask)
        bits = np.unpackbits(mask.view(np.uint8), bitorder="little")
        assert bits[t], f"token {t} at step {i} is not allowed by the grammar"
        assert ref.consume_token(t), ref.get_error()
    if finish_reason == "stop":
        assert ref.is_accepting()


@pytest.mark.parametrize("kind", list(FORMATS))
@pytest.mark.parametrize("sampling", range(len(SAMPLING)))
def test_every_token_is_allowed_by_an_independent_matcher(tiny, kind, sampling):
    lm, path = tiny
    rf = FORMATS[kind]
    out = lm.generate(MSGS, response_format=rf, max_new_tokens=60, **SAMPLING[sampling])
    tokens = out["token_ids"]
    assert tokens
    if kind == "tool":  # no stock constructor for it: replay through the Lark text on its own
        ref = independent_matcher(path, lm.backend.vocab_size, {"type": "grammar", "lark": rf["lark"]})
    else:
        ref = independent_matcher(path, lm.backend.vocab_size, rf)
    replay(ref, tokens, lm.backend.vocab_size, set(lm.eos_ids), out["finish_reason"])
    if out["finish_reason"] == "stop":
        check_output(kind, out["text"])
    else:  # only JSON with free strings can run out of tokens on a random model
        assert out["finish_reason"] == "length" and len(tokens) == 60
