"""Function tools over HTTP on the default chat model (SmolLM2-135M: the tiny test models' 256-token
context cannot hold a tools prompt): the openai SDK and LangChain's ChatOpenAI against the server.
Every reply is checked against the same request run in process (greedy: token-equal), so the HTTP layer's
translation (tools -> ToolSet, tool_calls / tool messages -> the engine's tool-call text, the reply ->
``tool_calls``) is what is tested."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from test_server import live_server
from tta_engine.manager import TransformersModelManager
from tta_engine.tool_calls import ToolSet, call_text, parse_tool_calls, result_text

pytest.importorskip("llguidance")
pytestmark = pytest.mark.e2e
LM = "smollm2-135m-instruct"
MSGS = [{"role": "user", "content": "What is the weather in Oslo? Then walk north."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"]}}}
MOVE = {"type": "function", "function": {
    "name": "move", "description": "Walk somewhere.",
    "parameters": {"type": "object", "properties": {"to": {"enum": ["north", "south"]}}, "required": ["to"]}}}
TOOLS = [WEATHER, MOVE]
GREEDY = {"temperature": 0, "max_tokens": 80}


@pytest.fixture(scope="module")
def served(default_artifacts):
    root, cfgs, _ = default_artifacts
    manager = TransformersModelManager(cfgs, artifacts_root=root)
    with live_server(manager, preload=(LM,)) as (server, url):
        yield manager, url


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0, timeout=120)


def in_process(manager, messages, tools: ToolSet | None, **kw) -> str:
    return asyncio.run(manager.complete(messages, LM, tools=tools, **GREEDY, **kw))["text"]


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]


@pytest.mark.parametrize("choice, required, only", [
    ("required", True, None),
    ({"type": "function", "function": {"name": "move"}}, True, "move"),
    ("auto", False, None),
])
@pytest.mark.parametrize("parallel", [False, True])
def test_tool_calls_equal_in_process_stream_and_not(served, client, choice, required, only, parallel):
    manager, _ = served
    offered = [t for t in TOOLS if only is None or t["function"]["name"] == only]
    ts = ToolSet(tuple(offered), required=required, parallel=parallel)
    ref = parse_tool_calls(in_process(manager, MSGS, ts), ts.schemas())
    want = [(c.name, c.arguments) for c in ref.calls]

    r = client.chat.completions.create(model=LM, messages=MSGS, tools=TOOLS, tool_choice=choice,
                                       parallel_tool_calls=parallel, **GREEDY)
    msg = r.choices[0].message
    assert calls_of(msg) == want
    if want:  # "length": several calls, the last one cut off by max_tokens (and dropped)
        assert r.choices[0].finish_reason == "tool_calls" or (parallel and r.choices[0].finish_reason == "length")
        assert all(c.id.startswith("call_") and c.type == "function" for c in msg.tool_calls)
        assert (msg.content or "") == ref.text
        assert not required or msg.content is None
        assert parallel or len(want) == 1
        assert only is None or {n for n, _ in want} == {only}
    else:  # "auto" answered in prose
        assert not required and msg.content and "<tool>" not in msg.content

    chunks = list(client.chat.completions.create(model=LM, messages=MSGS, tools=TOOLS, tool_choice=choice,
                                                 parallel_tool_calls=parallel, stream=True, **GREEDY))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = [tc for d in deltas for tc in d.tool_calls or ()]
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in streamed] == want
    assert [tc.index for tc in streamed] == list(range(len(want)))
    assert "".join(d.content or "" for d in deltas).strip() == (msg.content or "").strip()
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]


def test_one_call_per_reply_unless_parallel_is_asked(served, client):
    r = client.chat.completions.create(model=LM, messages=MSGS, tools=TOOLS, tool_choice="required", **GREEDY)
    assert len(r.choices[0].message.tool_calls) == 1 and r.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_parallel_flag_are_accepted_and_change_nothing(served, client):
    plain = client.chat.completions.create(model=LM, messages=MSGS, **GREEDY)
    none = client.chat.completions.create(model=LM, messages=MSGS, tools=TOOLS, tool_choice="none",
                                          parallel_tool_calls=True, **GREEDY)
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.choices[0].message.tool_calls is None


def test_tool_results_go_back_in_the_one_format(served, client):
    """An assistant turn with tool_calls and the tool's result, as the SDK sends them, render as the
    engine's call and result text (the reply equals in-process generation on those messages)."""
    manager, _ = served
    history = [*MSGS,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "rain, 4 C"}]
    engine_msgs = [*MSGS, {"role": "assistant", "content": call_text("get_weather", '{"city": "Oslo"}')},
                   {"role": "user", "content": result_text("get_weather", "rain, 4 C")}]
    ts = ToolSet(tuple(TOOLS))
    ref = parse_tool_calls(in_process(manager, engine_msgs, ts), ts.schemas())
    r = client.chat.completions.create(model=LM, messages=history, tools=TOOLS, **GREEDY)
    assert calls_of(r.choices[0].message) == [(c.name, c.arguments) for c in ref.calls]
    if not ref.calls:
        assert r.choices[0].message.content == in_process(manager, engine_msgs, ts)


def test_json_answer_or_a_call(served, client):
    """tools + response_format json_schema: the reply is a call or JSON valid for the schema."""
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
    for seed in range(3):
        r = client.chat.completions.create(
            model=LM, messages=MSGS, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=80,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
        msg = r.choices[0].message
        if r.choices[0].finish_reason == "tool_calls":
            assert calls_of(msg)
        elif r.choices[0].finish_reason == "stop":
            assert json.loads(msg.content)["answer"] in ("yes", "no")


def test_langchain_chat_openai_binds_tools_against_the_server(served):
    """LangChain's own OpenAI chat model (langchain_openai.ChatOpenAI) with bind_tools, pointed at the
    server: tool calls come back as AIMessage.tool_calls, streamed chunks add up to the same calls."""
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "rain"

    manager, url = served
    llm = ChatOpenAI(model=LM, base_url=url + "/v1", api_key="unused", temperature=0, max_tokens=80,
                     max_retries=0)
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    msg = bound.invoke([HumanMessage("What is the weather in Oslo?")])
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert isinstance(msg.tool_calls[0]["args"]["city"], str)
    chunks = list(bound.stream([HumanMessage("What is the weather in Oslo?")]))
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [(c["name"], c["args"]) for c in msg.tool_calls]
    # the tool's result back: accepted, answered (prose or another call)
    reply = bound.invoke([HumanMessage("What is the weather in Oslo?"), msg,
                          ToolMessage("rain", tool_call_id=msg.tool_calls[0]["id"])])
    assert reply.tool_calls or reply.content
