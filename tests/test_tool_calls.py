"""The one tool-call format (engine/tool_calls.py): grammar shapes (one call, parallel calls, prose first,
optional calls, a JSON final answer) checked with llguidance on a tiny model's tokenizer and by sampling,
parsing of every call, and the streaming splitter."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, Field
from tta_engine.errors import StructuredOutputError
from tta_engine.tool_calls import (
    ToolCallStream,
    call_text,
    merge_roles,
    parse_tool_call,
    parse_tool_calls,
    result_text,
    tool_call_format,
    tools_prompt,
)

pytest.importorskip("llguidance")
MSGS = [{"role": "user", "content": "The lantern flickers in the forest."}]


class Mood(BaseModel):
    mood: str = Field(pattern="^(calm|tense|happy)$")
    level: int = Field(ge=0, le=9)


MOVE = {"type": "object", "properties": {"to": {"enum": ["north", "south"]}}, "required": ["to"],
        "additionalProperties": False}
TOOLS = {"move": MOVE, "rate": Mood}
GO_N = call_text("move", {"to": "north"})
GO_S = call_text("move", {"to": "south"})
RATE = call_text("rate", {"mood": "calm", "level": 3})


@pytest.fixture(scope="module")
def tiny(artifacts, tiny_configs):
    from tta_engine.runtime import open_artifact_lm

    model = open_artifact_lm(artifacts.get("tiny-llama", "fp32"), tiny_configs["tiny-llama"])
    yield model
    model.close()


def accepts(lm, rf, text: str) -> bool:
    """Whether the grammar of ``rf`` accepts ``text`` (tokenized by the model) as a whole reply."""
    from tta_engine.structured import compile_for_model

    matcher = compile_for_model(lm, rf).matcher.deep_copy()
    tokens = lm.tokenizer.encode(text)
    if matcher.validate_tokens(tokens) != len(tokens):
        return False
    matcher.consume_tokens(tokens)
    return matcher.is_accepting()


def test_grammar_shapes(tiny):
    one = tool_call_format(TOOLS)
    assert accepts(tiny, one, GO_N) and accepts(tiny, one, RATE)
    assert not accepts(tiny, one, GO_N + GO_S)  # one call only
    assert not accepts(tiny, one, "Sure. " + GO_N)  # no prose
    assert not accepts(tiny, one, call_text("move", {"to": "up"}))  # parameters follow the schema
    assert not accepts(tiny, one, call_text("fly", {"to": "north"}))  # listed tools only

    many = tool_call_format(TOOLS, parallel=True)
    assert accepts(tiny, many, GO_N + GO_S) and accepts(tiny, many, GO_N + "\n" + RATE + " " + GO_S)
    assert accepts(tiny, many, GO_N)

    auto = tool_call_format(TOOLS, text_first=True, optional=True, parallel=True)
    # prose may hold "<" and tags, just not "<tool>"; it may end the reply or lead into calls
    assert accepts(tiny, auto, "if a < b then <b>go</b>")
    assert accepts(tiny, auto, "Let me look. " + GO_N + GO_S)
    assert accepts(tiny, auto, GO_N)
    assert not accepts(tiny, auto, "a <tool>move</tool> b")
    assert not accepts(tiny, auto, "text " + GO_N + " more text")  # nothing after the calls

    required_after_text = tool_call_format(TOOLS, text_first=True)
    assert accepts(tiny, required_after_text, "I go. " + GO_N)
    assert not accepts(tiny, required_after_text, "I go.")

    final = tool_call_format(TOOLS, optional=True, final=Mood)
    assert accepts(tiny, final, GO_N) and accepts(tiny, final, '{"mood": "tense", "level": 2}')
    assert not accepts(tiny, final, '{"mood": "sleepy", "level": 2}') and not accepts(tiny, final, "hello")

    with pytest.raises(StructuredOutputError, match="tool name"):
        tool_call_format({"<bad>": {}})
    with pytest.raises(StructuredOutputError, match="exclude"):
        tool_call_format(TOOLS, text_first=True, final=Mood)
    with pytest.raises(StructuredOutputError, match="optional"):
        tool_call_format(TOOLS, optional=True)


@pytest.mark.parametrize("shape", ["one", "parallel", "auto", "final"])
def test_sampled_replies_parse(tiny, shape):
    """Whatever a random model samples under each shape, a finished reply parses into that shape."""
    rf = {"one": tool_call_format(TOOLS), "parallel": tool_call_format(TOOLS, parallel=True),
          "auto": tool_call_format(TOOLS, text_first=True, optional=True, parallel=True),
          "final": tool_call_format(TOOLS, optional=True, final=Mood)}[shape]
    outs = [tiny.generate(MSGS, response_format=rf, max_new_tokens=160, temperature=1.0, seed=s) for s in range(6)]
    done = [o["text"] for o in outs if o["finish_reason"] == "stop"]
    assert done, "no sample finished within max_new_tokens"
    for text in done:
        if shape == "final" and not text.startswith("<tool>"):
            Mood.model_validate_json(text)
            continue
        reply = parse_tool_calls(text, TOOLS)
        if shape == "auto":
            assert "<tool>" not in reply.text
            continue
        assert reply.text == "" and reply.calls
        if shape in ("one", "final"):
            assert len(reply.calls) == 1
        for call in reply.calls:
            assert call.name in TOOLS and (call.name != "rate" or isinstance(call.parsed, Mood))


def test_parse_every_call_and_errors():
    reply = parse_tool_calls("I go. " + GO_N + "\n" + RATE, TOOLS)
    assert reply.text == "I go." and [c.name for c in reply.calls] == ["move", "rate"]
    assert reply.calls[1].parsed == Mood(mood="calm", level=3)
    assert parse_tool_calls("just prose, a < b", TOOLS).calls == ()
    assert parse_tool_call("I go. " + GO_N, TOOLS) == parse_tool_call(GO_N, TOOLS)
    # a string argument may contain the closing tag (grammar-valid; SmolLM2 wrote one in the benchmark)
    tricky = '<tool>move</tool><parameters>{"to": "north", "note": "a</parameters>b"}</parameters> then'
    note = {"move": {"type": "object", "properties": {"to": {"type": "string"}, "note": {"type": "string"}}}}
    assert parse_tool_call(tricky, note).arguments == {"to": "north", "note": "a</parameters>b"}
    bad = ['<tool>fly</tool><parameters>{"to": "north"}</parameters>',  # not a listed tool
           '<tool>move</tool><parameters>{"to": "up"}</parameters>',  # invalid parameters
           '<tool>move</tool><parameters>{"to": </parameters>',  # not JSON
           '<tool>rate</tool><parameters>{"mood": "sad", "level": 3}</parameters>',
           GO_N + '<tool>move</tool><parameters>{"to": "west"}</parameters>',  # the second call is invalid
           "<tool>move</tool><parameters>{\"to\": \"nor"]  # cut off
    for text in bad:
        with pytest.raises(StructuredOutputError) as err:
            parse_tool_calls(text, TOOLS)
        assert err.value.raw_text == text
    with pytest.raises(StructuredOutputError, match="no <tool>"):
        parse_tool_call("no call at all", TOOLS)


def _events(text: str, cuts: list[int]) -> list:
    stream, events, last = ToolCallStream(TOOLS), [], 0
    for cut in [*cuts, len(text)]:
        events += stream.feed(text[last:cut])
        last = cut
    return events + stream.finish()


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_stream_splits_prose_and_calls_at_any_delta_boundary(step):
    text = "a <b> and <to" + "ol? " + GO_N + "\n" + RATE
    events = _events(text, list(range(step, len(text), step)))
    prose = "".join(v for k, v in events if k == "text")
    calls = [v for k, v in events if k == "call"]
    assert prose == "a <b> and <tool? "
    assert [c.name for c in calls] == ["move", "rate"]
    assert [k for k, _ in events if k == "call"] == ["call", "call"] and events[-1][0] == "call"
    # prose only: everything comes out, the held-back "<to" included
    assert "".join(v for _, v in _events("x <to", [2, 4])) == "x <to"


def test_stream_emits_each_call_when_it_closes_and_fails_when_cut_off():
    stream = ToolCallStream(TOOLS)
    assert stream.feed("Hi ") == [("text", "Hi ")]
    assert stream.feed(GO_N[:-3]) == []
    first = stream.feed(GO_N[-3:] + RATE[:5])
    assert [k for k, _ in first] == ["call"] and first[0][1].arguments == {"to": "north"}
    with pytest.raises(StructuredOutputError, match="ended inside"):
        stream.finish()


def test_rendering_helpers():
    assert result_text("look", "a door") == "<tool_result>look</tool_result><content>a door</content>"
    assert "(error)" in result_text("look", "boom", error=True)
    assert json.loads(call_text("move", '{"to": "north"}').split("<parameters>")[1][:-13]) == {"to": "north"}
    hint = tools_prompt(TOOLS, {"move": "Walk somewhere."}, parallel=True)
    assert "- move: Walk somewhere." in hint and '"enum":["north","south"]' in hint and "several" in hint
    assert merge_roles([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"}]) == [{"role": "user", "content": "a\n\nb"},
                                                                   {"role": "assistant", "content": "c"}]


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} [{{ t.function.name }}: "
    "{{ t.function.parameters | tojson }}]{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_tools_go_into_the_templates_tools_section_where_it_has_one(tiny, monkeypatch):
    from tta_engine.chat_template import uses_tools
    from tta_engine.tool_calls import ToolSet

    ts = ToolSet(({"type": "function", "function": {"name": "move", "description": "Walk.", "parameters": MOVE}},),
                 required=True)
    assert not uses_tools(tiny.tokenizer.chat_template) and uses_tools(TOOLS_TEMPLATE)
    without = tiny.tokenizer.decode(tiny.encode_prompt(MSGS, ts))
    assert "- move: Walk. Parameters (JSON Schema):" in without and "<tool>NAME</tool>" in without
    monkeypatch.setattr(tiny.tokenizer, "chat_template", TOOLS_TEMPLATE)
    with_section = tiny.tokenizer.decode(tiny.encode_prompt(MSGS, ts))
    assert "Tools: [move: {" in with_section  # the template listed the tool
    assert "Parameters (JSON Schema)" not in with_section and "<tool>NAME</tool>" in with_section  # format only
    with pytest.raises(StructuredOutputError, match="at least one"):
        ToolSet(())
    from tta_engine.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="not both"):
        tiny.generate(MSGS, tools=ts, response_format=Mood, max_new_tokens=4)
    with pytest.raises(InvalidInputError, match="chat prompt"):
        tiny.generate("raw text", tools=ts, max_new_tokens=4)
