"""Structured output (engine/structured.py) on tiny random models: every constraint kind, the mask honoured
at every step (replayed through an independent matcher), typed compile errors, mixed batches,
cancellation, streaming, tool calls."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from typing import Literal

import numpy as np
import pytest
from pydantic import BaseModel, Field
from tta_engine.errors import StructuredOutputError
from tta_engine.manager import TransformersModelManager
from tta_engine.structured import (
    JSON_OPTIONS,
    compile_for_model,
    ll_tokenizer,
)
from tta_engine.tool_calls import parse_tool_call, tool_call_format

llguidance = pytest.importorskip("llguidance")
MSGS = [{"role": "user", "content": "The lantern flickers in the forest."}]


class Mood(BaseModel):
    mood: str = Field(pattern="^(calm|tense|happy)$")
    level: int = Field(ge=0, le=9)
    tags: list[Literal["sky", "sea"]] = Field(max_length=2)
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

    hf = AutoTokenizer.from_pretrained(path)
    llt = from_tokenizer(hf, n_vocab=max(vocab_size, len(hf)))  # the tokenizer may have ids past the logits
    M = llguidance.LLMatcher
    if isinstance(rf, type):  # the engine closes Pydantic objects (no keys beyond the declared fields)
        schema = {**rf.model_json_schema(), "additionalProperties": False}
        grammar = M.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
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
    return m, llt.vocab_size


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
    out = lm.generate(MSGS, response_format=rf, max_new_tokens=120, **SAMPLING[sampling])
    tokens = out["token_ids"]
    assert tokens
    if kind == "tool":  # no stock constructor for it: replay through the Lark text on its own
        ref, n_vocab = independent_matcher(path, lm.backend.vocab_size, {"type": "grammar", "lark": rf["lark"]})
    else:
        ref, n_vocab = independent_matcher(path, lm.backend.vocab_size, rf)
    replay(ref, tokens, n_vocab, set(lm.eos_ids), out["finish_reason"])
    assert out["finish_reason"] == "stop"  # every format here is bounded: it completes within 120 tokens
    check_output(kind, out["text"])


def run(coro):
    return asyncio.run(coro)


def test_manager_takes_every_format_and_generate_structured_validates(manager):
    async def main():
        outs = {k: await manager.complete(MSGS, "tiny-llama", response_format=rf, max_tokens=80, temperature=0.8,
                                          seed=3) for k, rf in FORMATS.items()}
        mood = await manager.generate_structured(MSGS, "tiny-llama", Mood, max_tokens=80, temperature=0)
        value = await manager.generate_structured(MSGS, "tiny-llama", SCHEMA, max_tokens=80, temperature=0)
        text = await manager.generate(MSGS, "tiny-llama", response_format={"type": "json_object"},
                                      max_tokens=40, temperature=0)
        deltas = []
        streamed = await manager.generate_streaming(MSGS, "tiny-llama", deltas.append, max_tokens=80,
                                                    temperature=0, response_format=Mood)
        chat = await manager.chat(MSGS, "tiny-llama", response_format=FORMATS["choice"], temperature=0)
        return outs, mood, value, text, deltas, streamed, chat

    outs, mood, value, text, deltas, streamed, chat = run(main())
    for kind, out in outs.items():
        assert out["finish_reason"] == "stop", (kind, out)
        check_output(kind, out["text"])
    assert isinstance(mood, Mood) and mood.model_dump_json() == Mood.model_validate_json(streamed).model_dump_json()
    assert "".join(deltas) == streamed and len(deltas) > 1
    check_output("schema", json.dumps(value))
    assert text.startswith("{")  # json_object: an object (possibly cut by max_tokens on a random model)
    assert chat in ("yes", "no", "maybe later")


def test_max_tokens_before_acceptance_is_length_and_raises_with_raw_text(manager):
    async def main():
        out = await manager.complete(MSGS, "tiny-llama", response_format=Mood, max_tokens=4, temperature=0)
        with pytest.raises(StructuredOutputError) as err:
            await manager.generate_structured(MSGS, "tiny-llama", Mood, max_tokens=4, temperature=0)
        return out, err.value

    out, err = run(main())
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 4
    assert err.raw_text == out["text"] and err.finish_reason == "length" and "max_tokens" in str(err)


@pytest.mark.parametrize("bad, words", [
    ({"type": "regex", "pattern": "[a-z"}, "regex"),
    ({"type": "grammar", "lark": "start: missing_rule"}, "missing_rule"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
    ({"type": "object", "properties": {"a": {"type": "no-such-type"}}}, "no-such-type"),
    ({"type": "choice", "choices": []}, "choices"),
    (42, "int"),
])
def test_a_constraint_that_does_not_compile_is_typed_and_decodes_nothing(manager, bad, words):
    async def main():
        with pytest.raises(StructuredOutputError, match=re.escape(words)):
            await manager.complete(MSGS, "tiny-llama", response_format=bad, max_tokens=8)
        requests = manager.stats()["tiny-llama"]["requests"]
        ok = await manager.generate(MSGS, "tiny-llama", response_format=FORMATS["choice"], temperature=0)
        return requests, ok

    requests, ok = run(main())
    assert requests == 0  # nothing reached the scheduler
    assert ok in ("yes", "no", "maybe later")  # and the model keeps serving


def test_mixed_batches_give_free_rows_the_text_they_get_alone(manager):
    prompts = [[{"role": "user", "content": f"Story {i}: " + "the river " * (i % 3 + 1)}] for i in range(8)]
    kws = [dict(temperature=0.9, top_k=40, seed=i) if i % 3 else dict(temperature=0) for i in range(8)]
    formats = [None, Mood, None, FORMATS["regex"], None, FORMATS["tool"], None, SCHEMA]

    async def main():
        together = await asyncio.gather(*[
            manager.complete(p, "tiny-llama", max_tokens=20, min_new_tokens=1, response_format=f, **kw)
            for p, kw, f in zip(prompts, kws, formats, strict=True)])
        alone = [await manager.complete(p, "tiny-llama", max_tokens=20, min_new_tokens=1, response_format=f, **kw)
                 for p, kw, f in zip(prompts, kws, formats, strict=True)]
        return together, alone

    together, alone = run(main())
    for t, a in zip(together, alone, strict=True):
        assert t["token_ids"] == a["token_ids"] and t["text"] == a["text"]
    free = [t["text"] for t, f in zip(together, formats, strict=True) if f is None]
    assert any(not t.startswith("{") for t in free)  # the free rows were not constrained
    assert manager._loaded["tiny-llama"].scheduler.steps > 0


def test_cancelling_a_constrained_request_frees_its_matcher(manager):
    from tta_engine.scheduler import END

    lm, _ = manager.load_model("tiny-llama")
    sched = manager._loaded["tiny-llama"].scheduler
    grammar = compile_for_model(lm, {"type": "regex", "pattern": "[a-z ]{200}"})
    items, first, done = [], threading.Event(), threading.Event()

    def emit(item):
        items.append(item)
        first.set()
        if item is END or isinstance(item, BaseException):
            done.set()

    req = sched.submit(lm.encode_prompt(MSGS), lm.params(max_tokens=200, temperature=0), emit, grammar=grammar)
    assert first.wait(10)
    req.cancel()
    assert done.wait(10)
    assert req.state.finish_reason == "cancelled" and len(req.state.tokens) < 200
    assert req.stream.grammar is None  # the matcher was dropped


def test_streaming_constrained_text_is_utf8_safe(manager):
    rf = {"type": "regex", "pattern": "(\U0001F600|\u2728|\u4f60\u597d) (\U0001F600|\u2728|\u4f60\u597d)"}

    async def main():
        deltas = [d async for d in manager.astream(MSGS, "tiny-llama", response_format=rf, max_tokens=30,
                                                   temperature=1.0, seed=2)]
        return deltas

    deltas = run(main())
    text = "".join(deltas)
    assert re.fullmatch("(\U0001F600|\u2728|\u4f60\u597d) (\U0001F600|\u2728|\u4f60\u597d)", text), text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_strings_prefix_reuse_and_wide_steps_with_constraints(artifacts, tiny_configs, tmp_path):
    artifacts.get("tiny-llama", "fp32")
    m = TransformersModelManager(tiny_configs, cache_dir=str(tmp_path / "c"), artifacts_root=artifacts.root / "auto",
                                 wide_step_rows=2)
    long = [{"role": "system", "content": "You are the narrator of a calm forest story. " * 3}] + MSGS
    try:
        async def main():
            stopped = await m.complete(MSGS, "tiny-llama", response_format={"type": "regex", "pattern": "[a-z]{3},[a-z]{3}"},
                                       stop=[","], temperature=0)
            first = await m.complete(long, "tiny-llama", response_format=Mood, max_tokens=80, temperature=0)
            second = await m.complete(long, "tiny-llama", response_format=Mood, max_tokens=80, temperature=0)
            wide = await asyncio.gather(*[m.complete(MSGS, "tiny-llama", response_format=FORMATS["lark"], temperature=1.0,
                                                     seed=i, max_tokens=30) for i in range(4)])
            return stopped, first, second, wide

        stopped, first, second, wide = run(main())
    finally:
        m.close()
    assert stopped["finish_reason"] == "stop" and re.fullmatch("[a-z]{3}", stopped["text"])
    assert first["token_ids"] == second["token_ids"] and first["finish_reason"] == "stop"
    Mood.model_validate_json(second["text"])
    assert m.stats()["tiny-llama"]["reused_prompt_tokens"] > 0
    for w in wide:
        check_output("lark", w["text"])


def test_bridge_needs_only_tokenizer_json_and_compiles_are_cached(tiny):
    import subprocess
    import sys

    lm, path = tiny
    script = f"""
import sys
from tokenizers import Tokenizer
from tta_engine.structured import compile_grammar, grammar_of
tok = Tokenizer.from_file({str(path / "tokenizer.json")!r})
g = compile_grammar(tok, {lm.backend.vocab_size}, {list(lm.eos_ids)}, grammar_of({{"type": "regex", "pattern": "[a-z]+"}}))
assert compile_grammar(tok, {lm.backend.vocab_size}, {list(lm.eos_ids)}, g.grammar) is g
st = g.start()
print(int(st.allowed().sum()))
assert "transformers" not in sys.modules and "torch" not in sys.modules
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    # the same mask as through the runtime's tokenizer object
    via_runtime = compile_for_model(lm, {"type": "regex", "pattern": "[a-z]+"}).start().allowed()
    assert int(res.stdout.strip()) == int(via_runtime.sum()) > 0
    llt = ll_tokenizer(lm.tokenizer, lm.backend.vocab_size, lm.eos_ids[0])
    assert ll_tokenizer(lm.tokenizer, lm.backend.vocab_size, lm.eos_ids[0]) is llt


def test_client_legacy_expect_json_and_json_schema(manager):
    from tta_engine.client import ClientModelConfig, GenerationRequest, LLMClient, Message

    client = LLMClient(manager)
    mc = ClientModelConfig("tiny-llama", max_tokens=120, temperature=0)
    msgs = [Message("user", "Describe the forest.")]

    async def main():
        by_schema = await client._call_transformers(mc, msgs, json_schema=SCHEMA)
        by_format = await client._call_transformers(mc, msgs, response_format=FORMATS["regex"])
        seen = []
        streamed = await client._call_transformers(mc, msgs, True, seen.append, response_format=FORMATS["lark"])
        loose = await client._call_transformers(ClientModelConfig("tiny-llama", max_tokens=8, temperature=0), msgs,
                                                expect_json=True)
        resp = await client.generate(GenerationRequest("Pick one:", max_tokens=20, temperature=0,
                                                       response_format=FORMATS["choice"]), "tiny-llama")
        return by_schema, by_format, streamed, seen, loose, resp

    by_schema, by_format, streamed, seen, loose, resp = run(main())
    check_output("schema", by_schema)
    check_output("regex", by_format)
    check_output("lark", streamed)
    assert "".join(seen) == streamed
    assert loose.startswith("{")
    check_output("choice", resp.text)
    assert resp.metadata["finish_reason"] == "stop"


def test_bridge_reads_gguf_converted_byte_level_tokenizers(tiny):
    """Transformers' GGUF converter writes the decoder as a Sequence [ByteFallback, Fuse, Replace, ByteLevel]
    (SmolLM2's artifact has it); llguidance must still read 'Ġ' as a space."""
    from tokenizers import Tokenizer
    from tta_engine.structured import compile_grammar, grammar_of

    lm, path = tiny
    state = json.loads((path / "tokenizer.json").read_text())
    state["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    tok = Tokenizer.from_str(json.dumps(state))
    text = 'go north, {"to": "river"}'
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ll_tokenizer(tok, lm.backend.vocab_size, lm.eos_ids[0]).decode_str(ids) == text
    g = compile_grammar(tok, lm.backend.vocab_size, lm.eos_ids, grammar_of({"type": "regex", "pattern": re.escape(text)}))
    st = g.start()
    for t in ids:
        assert st.allowed()[t]
        st.consume(t)
    assert st.is_stopped
