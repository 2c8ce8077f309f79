"""ChatTTAEngine and TTAEngineEmbeddings on tiny artifacts: langchain-tests' standard suites, streaming
callbacks, batching through the scheduler, stop sequences, usage metadata."""

from __future__ import annotations

import asyncio
import importlib.util

import numpy as np
import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler  # noqa: E402
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage  # noqa: E402
from langchain_core.utils.function_calling import convert_to_openai_tool  # noqa: E402
from langchain_tests.integration_tests import ChatModelIntegrationTests, EmbeddingsIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests, EmbeddingsUnitTests  # noqa: E402
from tta_engine.integrations.langchain import ChatTTAEngine, TTAEngineEmbeddings, to_engine_messages  # noqa: E402
from tta_engine.manager import TransformersModelManager  # noqa: E402

LM, EMB = "tiny-llama", "tiny-bert"
# langchain-tests' async tests are plain ``async def``: run them with pytest-asyncio
ASYNC = [pytest.mark.asyncio, pytest.mark.filterwarnings("ignore:The test <Function")]
_MANAGER: dict[str, TransformersModelManager] = {}


@pytest.fixture(scope="module", autouse=True)
def manager(artifacts, tiny_configs, tmp_path_factory):
    artifacts.get(LM, "fp32")
    artifacts.get(EMB, "fp32")
    m = TransformersModelManager(tiny_configs, cache_dir=str(tmp_path_factory.mktemp("lc-cache")),
                                 artifacts_root=artifacts.root / "auto")
    _MANAGER["m"] = m
    yield m
    _MANAGER.clear()
    m.close()


class TestChatUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self):
        return ChatTTAEngine

    @property
    def chat_model_params(self):
        return {"model": LM}


class TestEmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self):
        return TTAEngineEmbeddings

    @property
    def embedding_model_params(self):
        return {"model": EMB}


class TestChatIntegrationTiny(ChatModelIntegrationTests):
    """The standard integration suite's plain paths on a tiny random model (tool-calling and structured
    tests need a model that understands the question: they run on the default model in
    tests/test_langchain_e2e.py)."""

    pytestmark = ASYNC

    @property
    def chat_model_class(self):
        return ChatTTAEngine

    @property
    def chat_model_params(self):
        return {"model": LM, "manager": _MANAGER["m"], "max_tokens": 12, "min_new_tokens": 1}

    @property
    def has_tool_calling(self):
        return False

    @property
    def has_structured_output(self):
        return False

    @property
    def supports_json_mode(self):
        return False

    @property
    def supports_model_override(self):
        return True

    @property
    def model_override_value(self):
        return "tiny-qwen2"


class TestEmbeddingsIntegration(EmbeddingsIntegrationTests):
    pytestmark = ASYNC
    @property
    def embeddings_class(self):
        return TTAEngineEmbeddings

    @property
    def embedding_model_params(self):
        return {"model": EMB, "manager": _MANAGER["m"]}


def chat(**kw):
    # describe_tools off: the tiny model's 256-token context cannot hold the tools prompt (the grammar
    # alone enforces the calls; the prompt is checked in test_prompt_lists_the_tools...)
    return ChatTTAEngine(**{"model": LM, "manager": _MANAGER["m"], "temperature": 0, "max_tokens": 10,
                            "describe_tools": False, **kw})


MSGS = [SystemMessage("You are a narrator."), HumanMessage("The lantern flickers in the forest.")]


def test_invoke_matches_the_manager_and_reports_usage(manager):
    msg = chat().invoke(MSGS)
    ref = asyncio.run(manager.complete(to_engine_messages(MSGS), LM, max_tokens=10, temperature=0))
    assert isinstance(msg, AIMessage) and msg.content == ref["text"]
    assert msg.usage_metadata["input_tokens"] == ref["usage"]["prompt_tokens"]
    assert msg.usage_metadata["output_tokens"] == ref["usage"]["completion_tokens"] > 0
    assert msg.response_metadata["finish_reason"] == ref["finish_reason"]
    assert msg.response_metadata["model_name"] == LM


class Tokens(BaseCallbackHandler):
    def __init__(self):
        self.tokens = []

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)


class AsyncTokens(AsyncCallbackHandler):
    def __init__(self):
        self.tokens = []

    async def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)


def test_stream_calls_on_llm_new_token_per_delta_and_ends_with_usage():
    model = chat()
    full = model.invoke(MSGS).content
    cb = Tokens()
    chunks = list(model.stream(MSGS, config={"callbacks": [cb]}))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    deltas = [c.content for c in chunks if c.content]
    assert len(deltas) > 1 and "".join(deltas) == full
    assert [t for t in cb.tokens if t] == deltas  # one callback per streamed delta (+ the empty last chunk)
    total = sum(chunks[1:], chunks[0])
    assert total.usage_metadata["output_tokens"] > 0 and total.response_metadata["finish_reason"]

    acb = AsyncTokens()

    async def main():
        return [c async for c in model.astream(MSGS, config={"callbacks": [acb]})]

    achunks = asyncio.run(main())
    assert "".join(c.content for c in achunks) == full and [t for t in acb.tokens if t] == deltas


def test_streaming_flag_makes_invoke_stream_through_callbacks():
    cb = Tokens()
    msg = chat(streaming=True).invoke(MSGS, config={"callbacks": [cb]})
    assert len(cb.tokens) > 1 and "".join(cb.tokens) == msg.content == chat().invoke(MSGS).content


def test_stop_sequences_cut_the_reply():
    full = chat(max_tokens=16).invoke(MSGS).content
    cut = full[3:6]
    assert cut and cut in full
    short = chat(max_tokens=16).invoke(MSGS, stop=[cut]).content
    assert short == full[: full.index(cut)]
    assert chat(max_tokens=16, stop=[cut]).invoke(MSGS).content == short


def test_batch_of_8_is_decoded_in_shared_scheduler_steps(manager):
    prompts = [f"Tell me about lantern number {i}." for i in range(8)]
    model = ChatTTAEngine(model=LM, manager=manager, temperature=0, max_tokens=16, min_new_tokens=16)
    sequential = [model.invoke(p).content for p in prompts]
    before = manager.stats()[LM]["scheduler_steps"]
    out = model.batch(prompts)
    steps = manager.stats()[LM]["scheduler_steps"] - before
    assert [m.content for m in out] == sequential  # same request, same answer, batched or not
    # 8 requests x 16 tokens: one at a time takes 8 x 15 decode steps; batched, the rows share steps
    assert steps < 8 * 15 / 2, steps

    async def main():
        b = manager.stats()[LM]["scheduler_steps"]
        res = await model.abatch(prompts)
        return res, manager.stats()[LM]["scheduler_steps"] - b

    res, asteps = asyncio.run(main())
    assert [m.content for m in res] == sequential and asteps < 8 * 15 / 2


def test_per_call_sampling_overrides_and_unknown_kwargs(manager):
    a = chat().invoke(MSGS, max_tokens=3)
    assert a.usage_metadata["output_tokens"] <= 3
    with pytest.raises(Exception, match="unsupported argument"):
        chat().invoke(MSGS, frobnicate=1)


def test_images_are_refused_with_a_typed_error():
    from tta_engine.errors import TTAEngineError

    msg = HumanMessage(content=[{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])
    with pytest.raises(TTAEngineError, match="read text only"):
        chat().invoke([msg])


def test_embeddings_equal_the_engine_encoder(manager):
    emb = TTAEngineEmbeddings(model=EMB, manager=manager)
    texts = ["calm lake", "a storm at sea", "calm lake"]
    docs = emb.embed_documents(texts)
    ref = manager.embed(texts, EMB)
    np.testing.assert_allclose(np.asarray(docs), ref, rtol=1e-6)
    np.testing.assert_allclose(emb.embed_query("a storm at sea"), ref[1], rtol=1e-6)
    assert asyncio.run(emb.aembed_documents(texts)) == docs
    assert emb.embed_documents([]) == []


# -- tools and structured output (constrained decoding: valid even from a random model) ---------------
from typing import Literal  # noqa: E402

from pydantic import BaseModel  # noqa: E402

# constrained decoding (response_format) comes with engine/structured.py (branch structured)
needs_structured = pytest.mark.skipif(importlib.util.find_spec("tta_engine.structured") is None,
                                      reason="tta_engine.structured (constrained decoding) is not installed")


class Move(BaseModel):
    """Move the player."""

    direction: Literal["north", "south"]
    steps: Literal[1, 2, 3]  # bounded, so that a random model's call fits the tiny context


def look(target: Literal["door", "tree"]) -> str:
    """Look at something."""
    return target


GO = [HumanMessage("Go.")]  # short: the tiny model's context is 256 tokens


@needs_structured
def test_bind_tools_returns_langchain_tool_calls_that_validate():
    model = chat(max_tokens=100).bind_tools([Move, look], tool_choice="any")
    msg = model.invoke(GO)
    assert len(msg.tool_calls) == 1 and msg.response_metadata["finish_reason"] == "tool_calls"
    call = msg.tool_calls[0]
    assert call["type"] == "tool_call" and call["id"]
    if call["name"] == "Move":
        Move.model_validate(call["args"])
    else:
        assert call["name"] == "look" and call["args"]["target"] in ("door", "tree")
    forced = chat(max_tokens=100).bind_tools([Move, look], tool_choice="Move").invoke(GO)
    assert forced.tool_calls[0]["name"] == "Move" and Move.model_validate(forced.tool_calls[0]["args"])
    # streamed: the call arrives as tool_call_chunks that aggregate to the same call
    chunks = list(chat(max_tokens=100).bind_tools([Move, look], tool_choice="Move").stream(GO))
    total = sum(chunks[1:], chunks[0])
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [("Move", forced.tool_calls[0]["args"])]
    with pytest.raises(Exception, match="names no bound tool"):
        chat().bind_tools([Move], tool_choice="fly")


@needs_structured
def test_tool_choice_auto_allows_text_or_one_valid_call():
    msg = chat(max_tokens=100).bind_tools([Move], tool_choice="auto").invoke(GO)
    assert isinstance(msg, AIMessage)
    for call in msg.tool_calls:
        Move.model_validate(call["args"])
    assert "<tool>" not in msg.content


def test_prompt_lists_the_tools_unless_describe_tools_is_off():
    model = ChatTTAEngine(model=LM, manager=_MANAGER["m"])
    _, _, call, _ = model._request(GO, None, {"tools": [convert_to_openai_tool(Move)], "tool_choice": "any"})
    lm, _ = _MANAGER["m"].load_model(LM)
    prompt = lm.tokenizer.decode(lm.encode_prompt(to_engine_messages(GO), call["tools"]))
    assert "- Move" in prompt and "Parameters (JSON Schema)" in prompt and "<tool>NAME</tool>" in prompt
    _, _, call, _ = chat()._request(GO, None, {"tools": [convert_to_openai_tool(Move)]})
    assert lm.encode_prompt(to_engine_messages(GO), call["tools"]) == lm.encode_prompt(to_engine_messages(GO))


@needs_structured
def test_prose_streams_as_it_comes_when_tools_are_bound():
    """tool_choice="auto" and a prose answer: the text arrives in several chunks, not once at the end
    (seeds until one sample answers in prose); several calls per reply with parallel_tool_calls."""
    for seed in range(8):
        chunks = list(chat(max_tokens=30, temperature=1.0, seed=seed).bind_tools([Move], tool_choice="auto").stream(GO))
        total = sum(chunks[1:], chunks[0])
        if not total.tool_calls and len(total.content) > 3:
            break
    else:
        pytest.fail("no sample answered in prose")
    assert len([c for c in chunks if c.content]) >= 2 and "<tool>" not in total.content
    many = chat(max_tokens=160).bind_tools([look], tool_choice="any", parallel_tool_calls=True).invoke(GO)
    assert many.tool_calls and all(c["name"] == "look" for c in many.tool_calls)


def test_tool_results_go_back_to_the_model_as_text():
    from langchain_core.messages import ToolMessage

    call = {"name": "look", "args": {"target": "door"}, "id": "call_1", "type": "tool_call"}
    msgs = [HumanMessage("Look at the door."), AIMessage("", tool_calls=[call]),
            ToolMessage("An old oak door.", tool_call_id="call_1", name="look")]
    rendered = to_engine_messages(msgs)
    assert rendered[1] == {"role": "assistant", "content": '<tool>look</tool><parameters>{"target": "door"}</parameters>'}
    assert rendered[2] == {"role": "user", "content": "<tool_result>look</tool_result><content>An old oak door."
                                                      "</content>"}  # the format Pydantic-AI and the server use
    assert isinstance(chat().invoke(msgs), AIMessage)


@needs_structured
def test_with_structured_output_is_always_valid():
    out = chat(max_tokens=120).with_structured_output(Move).invoke(MSGS)
    assert isinstance(out, Move) and out.direction in ("north", "south")
    as_dict = chat(max_tokens=120).with_structured_output(Move.model_json_schema()).invoke(MSGS)
    Move.model_validate(as_dict)
    raw = chat(max_tokens=120).with_structured_output(Move, include_raw=True).invoke(MSGS)
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], Move) and isinstance(raw["raw"], AIMessage)
    via_tools = chat(max_tokens=100).with_structured_output(Move, method="function_calling").invoke(GO)
    assert isinstance(via_tools, Move)
    json_mode = chat().with_structured_output(None, method="json_mode")
    assert json_mode.first.kwargs["response_format"] == {"type": "json_object"}


@needs_structured
def test_structured_output_that_runs_out_of_tokens_raises_structured_error():
    from tta_engine.errors import StructuredOutputError

    with pytest.raises(StructuredOutputError):
        chat(max_tokens=2).with_structured_output(Move).invoke(MSGS)
