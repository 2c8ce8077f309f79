"""LangGraph nodes on tiny artifacts: prototype routing, narrator streaming through
stream_mode="messages", structured extraction into the state."""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Literal

import pytest

pytest.importorskip("langgraph")

from langgraph.graph import END, START, StateGraph  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from tta_engine.integrations.langchain import ChatTTAEngine  # noqa: E402
from tta_engine.integrations.langgraph import (  # noqa: E402
    GameState,
    classifier_node,
    extraction_node,
    narrator_node,
    route_on,
)
from tta_engine.manager import TransformersModelManager  # noqa: E402

LM, EMB = "tiny-llama", "tiny-bert"
needs_structured = pytest.mark.skipif(importlib.util.find_spec("tta_engine.structured") is None,
                                      reason="tta_engine.structured (constrained decoding) is not installed")
PROTOS = {"distress": ["The lantern flickers as you step into the quiet forest."],
          "explore": ["The river sings over smooth stones under the moon."]}


@pytest.fixture(scope="module")
def manager(artifacts, tiny_configs, tmp_path_factory):
    artifacts.get(LM, "fp32")
    artifacts.get(EMB, "fp32")
    m = TransformersModelManager(tiny_configs, cache_dir=str(tmp_path_factory.mktemp("lg-cache")),
                                 artifacts_root=artifacts.root / "auto")
    yield m
    m.close()


def graph(manager):
    llm = ChatTTAEngine(model=LM, manager=manager, temperature=0, max_tokens=8, min_new_tokens=8)
    g = StateGraph(GameState)
    g.add_node("classify", classifier_node(list(PROTOS), prototypes=PROTOS, manager=manager,
                                           embedding_model=EMB, flag_labels=["distress"]))
    g.add_node("grounding", narrator_node(llm, "Guide a grounding exercise."))
    g.add_node("narrate", narrator_node(llm, "Continue the story."))
    g.add_conditional_edges("classify", route_on("emotion", {"distress": "grounding", "explore": "narrate"}),
                            ["grounding", "narrate"])
    g.add_edge(START, "classify")
    g.add_edge("grounding", END)
    g.add_edge("narrate", END)
    return g.compile(), llm


def test_routes_on_the_nearest_prototype_and_streams_the_narrator(manager):
    app, llm = graph(manager)

    async def run(text):
        tokens, final = [], None
        async for mode, item in app.astream({"player_input": text}, stream_mode=["messages", "values"]):
            if mode == "messages":
                assert item[0].type != "ai", item  # the reply streamed as chunks is not repeated whole
                if item[0].type == "AIMessageChunk":
                    tokens.append((item[1]["langgraph_node"], item[0].content))
            else:
                final = item
        return tokens, final

    for text, label, node, prompt in [(PROTOS["distress"][0], "distress", "grounding", "Guide a grounding exercise."),
                                      (PROTOS["explore"][0], "explore", "narrate", "Continue the story.")]:
        tokens, state = asyncio.run(run(text))
        assert state["emotion"] == label and state["safety_flag"] == (label == "distress")
        assert state["emotion_scores"][label] > 0.5
        streamed = [t for n, t in tokens if n == node and t]
        assert len(streamed) > 1 and "".join(streamed) == state["narration"]  # token by token
        assert {n for n, _ in tokens} == {node}  # the other branch did not run
        ref = llm.invoke([("system", prompt), ("human", text)]).content
        assert state["narration"] == ref
        assert [m.type for m in state["messages"]] == ["human", "ai"]


@needs_structured
def test_choice_classifier_answers_one_of_the_labels(manager):
    node = classifier_node(["north", "south", "east"], mode="choice", manager=manager, llm_model=LM)
    out = asyncio.run(node({"player_input": "Which way?"}))
    assert out["emotion"] in ("north", "south", "east")
    assert out["emotion_scores"] == {lab: float(lab == out["emotion"]) for lab in ("north", "south", "east")}


class Scene(BaseModel):
    location: Literal["forest", "river", "tower"]
    danger: Literal[0, 1, 2]


@needs_structured
def test_extraction_node_writes_a_validated_instance(manager):
    llm = ChatTTAEngine(model=LM, manager=manager, temperature=0, max_tokens=120)
    node = extraction_node(llm, Scene)
    out = asyncio.run(node({"narration": "You reach the river."}))
    assert isinstance(out["scene"], Scene)


def test_bad_configuration_fails_early():
    with pytest.raises(ValueError, match="mode"):
        classifier_node(["a"], mode="vibes")
    with pytest.raises(ValueError, match="flag labels"):
        classifier_node(["a", "b"], flag_labels=["c"])
    with pytest.raises(ValueError, match="no route"):
        route_on("emotion", {"a": "x"})({"emotion": "b"})
