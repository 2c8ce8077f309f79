"""Pydantic-AI on tta-engine, on a tiny random model: the Model interface's shapes, constrained output and
tool calls (so even a random model's replies validate), tool results round-trip, streaming, settings,
usage equal to the engine's counts, engine errors as pydantic-ai's types."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("pydantic_ai")
pytest.importorskip("llguidance")

from pydantic import BaseModel, ConfigDict, Field  # noqa: E402
from pydantic_ai import Agent, ModelRetry, NativeOutput, PromptedOutput, ToolOutput  # noqa: E402
from pydantic_ai.exceptions import (  # noqa: E402
    ModelContextWindowExceededError,
    ModelNotFoundError,
    UnexpectedModelBehavior,
)
from pydantic_ai.messages import ModelRequest, TextPart, ToolCallPart, ToolReturnPart, UserPromptPart  # noqa: E402
from pydantic_ai.models import ModelRequestParameters  # noqa: E402
from tta_engine.integrations.pydantic_ai import TTAEngineModel, TTAEngineModels  # noqa: E402

MODEL = "tiny-llama"
# the tiny model has 256 positions: no schema or tool descriptions in its prompts (the grammar holds anyway)
SMALL = {"profile": {"supports_tools": True, "supports_json_schema_output": True,
                     "supports_json_object_output": True, "default_structured_output_mode": "native"},
         "describe_tools": False}


class Mood(BaseModel):
    model_config = ConfigDict(extra="forbid")
    word: str = Field(max_length=8)
    level: int = Field(ge=0, le=9)


class Dice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sides: int = Field(ge=2, le=20)


@pytest.fixture(scope="module")
def manager(shared_manager):
    return shared_manager  # conftest's manager over the tiny fp32 artifacts (tiny-llama among them)


def test_request_returns_text_with_the_engines_usage(manager):
    model = TTAEngineModel(MODEL, manager, **SMALL)
    msgs = [ModelRequest(parts=[UserPromptPart("You feel calm.")])]
    resp = asyncio.run(model.request(msgs, {"max_tokens": 5, "temperature": 0}, ModelRequestParameters()))
    assert isinstance(resp.parts[0], TextPart) and resp.model_name == MODEL and resp.provider_name == "tta-engine"
    ref = asyncio.run(manager.complete([{"role": "user", "content": "You feel calm."}], MODEL, max_tokens=5,
                                       temperature=0))
    assert resp.parts[0].content == ref["text"]
    assert resp.usage.input_tokens == ref["usage"]["prompt_tokens"]
    assert resp.usage.output_tokens == ref["usage"]["completion_tokens"] <= 5
    assert resp.finish_reason in ("stop", "length")


class Level(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(ge=0, le=9)


@pytest.mark.parametrize("wrap", [lambda t: t, NativeOutput, lambda t: PromptedOutput(t, template="{schema}"),
                                  ToolOutput])
def test_structured_output_validates_in_every_output_mode(manager, wrap):
    agent = Agent(TTAEngineModel(MODEL, manager, **SMALL), output_type=wrap(Level))
    result = agent.run_sync("Level?", model_settings={"max_tokens": 80})
    assert isinstance(result.output, Level)
    agent = Agent(TTAEngineModel(MODEL, manager, **SMALL), output_type=Mood)
    assert isinstance(agent.run_sync("How do you feel?", model_settings={"max_tokens": 60}).output, Mood)


def test_the_default_profile_puts_the_schema_in_the_instructions(manager):
    from pydantic_ai.models import ModelRequestParameters as P
    from pydantic_ai.output import OutputObjectDefinition

    model = TTAEngineModel(MODEL, manager)
    params = P(output_mode="auto", output_object=OutputObjectDefinition(json_schema=Mood.model_json_schema()))
    _, prepared = model.prepare_request({}, params)
    plan = model._plan([ModelRequest(parts=[UserPromptPart("Mood?")])], {}, prepared)
    assert prepared.output_mode == "native" and '"level"' in plan.chat[0]["content"]
    assert plan.response_format["type"] == "json_schema"


def test_usage_of_a_run_equals_the_engines_counts(manager):
    agent = Agent(TTAEngineModel(MODEL, manager, **SMALL), output_type=Mood)
    before = manager.stats()[MODEL]
    result = agent.run_sync("How do you feel?", model_settings={"max_tokens": 60})
    after = manager.stats()[MODEL]
    usage = result.usage
    assert usage.input_tokens == after["prompt_tokens"] - before["prompt_tokens"]
    assert usage.output_tokens == after["completion_tokens"] - before["completion_tokens"]
    assert usage.requests == 1


def test_function_tools_are_called_with_valid_arguments_and_results_go_back(manager):
    calls = []
    agent = Agent(TTAEngineModel(MODEL, manager, **SMALL), output_type=Mood)

    @agent.tool_plain
    def roll(dice: Dice) -> str:
        """Roll a calming check."""
        calls.append(dice)
        return f"rolled {dice.sides}"

    def settings(ctx):  # the first step must call a function tool, the next one answers
        return {"max_tokens": 60, "tool_choice": "required" if ctx.run_step <= 1 else "none"}

    result = agent.run_sync("Roll then answer.", model_settings=settings)
    assert calls and all(isinstance(d, Dice) for d in calls)
    msgs = result.all_messages()
    call = next(p for m in msgs for p in m.parts if isinstance(p, ToolCallPart) and p.tool_name == "roll")
    ret = next(p for m in msgs for p in m.parts if isinstance(p, ToolReturnPart) and p.tool_name == "roll")
    assert ret.tool_call_id == call.tool_call_id and ret.content.startswith("rolled ")
    assert isinstance(result.output, Mood)


def test_tool_results_are_rendered_into_the_next_prompt(manager):
    model = TTAEngineModel(MODEL, manager, **SMALL)
    params = ModelRequestParameters()
    msgs = [ModelRequest(parts=[UserPromptPart("Roll.")]),
            __import__("pydantic_ai.messages", fromlist=["ModelResponse"]).ModelResponse(
                parts=[ToolCallPart("roll", {"sides": 6}, tool_call_id="c1")]),
            ModelRequest(parts=[ToolReturnPart("roll", "rolled 4", tool_call_id="c1")])]
    chat = model._plan(msgs, {}, model.prepare_request({}, params)[1]).chat
    assert chat[-2] == {"role": "assistant", "content": '<tool>roll</tool><parameters>{"sides":6}</parameters>'}
    assert "rolled 4" in chat[-1]["content"] and chat[-1]["role"] == "user"


def test_streaming_text_and_structured_output(manager):
    agent = Agent(TTAEngineModel(MODEL, manager, **SMALL))

    async def engine_deltas(prompt):
        return [d async for d in manager.astream([{"role": "user", "content": prompt}], MODEL, max_tokens=8,
                                                 temperature=0)]

    prompt, ref = next((p, r) for p in ["The river", "Hello! ", "You feel calm.", "A wise mentor", "The lantern"]
                       if len(r := asyncio.run(engine_deltas(p))) >= 3)

    async def text():
        async with agent.run_stream(prompt, model_settings={"max_tokens": 8, "temperature": 0}) as run:
            return [t async for t in run.stream_text(delta=True, debounce_by=None)], await run.get_output()

    chunks, output = asyncio.run(text())
    assert output == "".join(ref) and "".join(chunks) == output and len(chunks) >= 2  # streamed, not at once

    sagent = Agent(TTAEngineModel(MODEL, manager, **SMALL), output_type=Mood)

    async def structured():
        async with sagent.run_stream("Mood?", model_settings={"max_tokens": 60}) as run:
            return [o async for o in run.stream_output(debounce_by=None)]

    outs = asyncio.run(structured())
    assert isinstance(outs[-1], Mood)


def test_settings_are_honoured(manager):
    agent = Agent(TTAEngineModel(MODEL, manager, **SMALL))
    a = agent.run_sync("The lantern", model_settings={"max_tokens": 12, "temperature": 1.0, "seed": 7}).output
    b = agent.run_sync("The lantern", model_settings={"max_tokens": 12, "temperature": 1.0, "seed": 7}).output
    assert a == b  # seeded
    r = agent.run_sync("The lantern", model_settings={"max_tokens": 3, "temperature": 0})
    assert r.usage.output_tokens <= 3
    # stop strings, on Model.request (an agent would retry an empty reply): same text as the engine's
    model = TTAEngineModel(MODEL, manager, **SMALL)
    msgs = [ModelRequest(parts=[UserPromptPart("The lantern")])]
    chat = [{"role": "user", "content": "The lantern"}]

    def request(**extra):
        settings = {"max_tokens": 12, "temperature": 0, **extra}
        parts = asyncio.run(model.request(msgs, settings, ModelRequestParameters())).parts
        return "".join(p.content for p in parts)

    free = request()
    stop = free[2:4]
    stopped = request(stop_sequences=[stop])
    assert stopped == free[: free.index(stop)] and len(stopped) < len(free)
    assert stopped == asyncio.run(manager.generate(chat, MODEL, max_tokens=12, temperature=0, stop=[stop]))


def test_output_validator_retries_then_unexpected_model_behavior(manager):
    agent = Agent(TTAEngineModel(MODEL, manager, **SMALL), output_type=Level, retries=1)
    seen = []

    @agent.output_validator
    def reject(out: Level) -> Level:
        seen.append(out)
        raise ModelRetry("the mood needs a goal")

    with pytest.raises(UnexpectedModelBehavior):
        agent.run_sync("Mood?", model_settings={"max_tokens": 30})
    assert len(seen) == 2  # first try + one retry


def test_engine_errors_surface_as_pydantic_ai_errors(manager):
    agent = Agent(TTAEngineModel(MODEL, manager, **SMALL), output_type=Mood)
    with pytest.raises(UnexpectedModelBehavior, match="token limit"):  # the JSON cannot finish in 2 tokens
        agent.run_sync("Mood?", model_settings={"max_tokens": 2})
    agent = Agent(TTAEngineModel(MODEL, manager, **SMALL), output_type=ToolOutput(Mood))
    with pytest.raises(UnexpectedModelBehavior, match="no <tool>") as exc:  # nor the tool call
        agent.run_sync("Mood?", model_settings={"max_tokens": 2})
    assert type(exc.value.__cause__).__name__ == "StructuredOutputError" and exc.value.body
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        Agent(TTAEngineModel("no-such-model", manager)).run_sync("hi")
    with pytest.raises(ModelContextWindowExceededError, match="context"):
        Agent(TTAEngineModel(MODEL, manager, **SMALL)).run_sync("calm " * 400)


def test_tta_engine_model_ids_resolve_through_the_capability(manager):
    agent = Agent(f"tta-engine:{MODEL}", capabilities=[TTAEngineModels(manager)])
    result = agent.run_sync("The river", model_settings={"max_tokens": 4})
    assert result.response.model_name == MODEL


def test_tool_call_grammar_never_yields_an_unparseable_call(manager):
    from tta_engine.tool_calls import ToolSet, parse_tool_call

    tools = {"roll": Dice.model_json_schema(), "look": {"type": "object", "properties": {
        "place": {"type": "string", "maxLength": 10}}, "required": ["place"], "additionalProperties": False}}
    fmt = ToolSet(tuple({"type": "function", "function": {"name": n, "parameters": p}} for n, p in tools.items()),
                  required=True).response_format()
    for seed in range(5):
        text = asyncio.run(manager.generate([{"role": "user", "content": "Act."}], MODEL, response_format=fmt,
                                            temperature=1.0, seed=seed, max_tokens=60))
        call = parse_tool_call(text, tools)
        assert call.name in tools and json.loads(json.dumps(call.arguments)) == call.arguments
