"""The LangChain/LangGraph/spaCy integrations end to end on the packaged default models (the examples,
as shipped): workflow routing, prototype textcat, entity spans, batching through the scheduler."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
from helpers import load_example

pytest.importorskip("langgraph")
spacy = pytest.importorskip("spacy")

pytestmark = pytest.mark.e2e
SENTENCE = "I'm feeling anxious about my upcoming presentation."
DISTRESS, ACTION = "I can't breathe, everything is too much", "I open the old door"
needs_structured = pytest.mark.skipif(importlib.util.find_spec("tta_engine.structured") is None,
                                      reason="tta_engine.structured (constrained decoding) is not installed")


@pytest.fixture(scope="module")
def manager(default_manager):
    return default_manager  # installed as the examples' process-wide default manager


def test_narrator_streams_through_the_graph_on_the_default_model(manager):
    from langgraph.graph import END, START, StateGraph
    from tta_engine.integrations.langchain import ChatTTAEngine
    from tta_engine.integrations.langgraph import GameState, narrator_node

    wf = load_example("langgraph_workflow")
    g = StateGraph(GameState)
    g.add_node("narrate", narrator_node(ChatTTAEngine(temperature=0, max_tokens=24), wf.NARRATOR))
    g.add_edge(START, "narrate")
    g.add_edge("narrate", END)
    app = g.compile()

    async def main():
        tokens, final = [], None
        async for mode, item in app.astream({"player_input": ACTION}, stream_mode=["messages", "values"]):
            if mode == "messages" and item[0].type == "AIMessageChunk" and item[0].content:
                tokens.append(item[0].content)
            elif mode == "values":
                final = item
        return tokens, final

    tokens, state = asyncio.run(main())
    assert len(tokens) > 3 and "".join(tokens) == state["narration"] and state["narration"].strip()


def test_workflow_classifier_labels_distress_panic_and_an_action_not(manager):
    wf = load_example("langgraph_workflow")
    from tta_engine.integrations.langgraph import classifier_node

    node = classifier_node(list(wf.EMOTIONS), prototypes=wf.EMOTIONS, flag_labels=["panic"])
    d, a = (asyncio.run(node({"player_input": t})) for t in (DISTRESS, ACTION))
    assert d["emotion"] == "panic" and d["safety_flag"] is True, d
    assert a["emotion"] != "panic" and a["safety_flag"] is False, a


@needs_structured
def test_workflow_routes_distress_to_grounding_and_actions_to_the_story(manager):
    wf = load_example("langgraph_workflow")
    graph = wf.build_workflow(max_tokens=32)

    async def main():
        return [await wf.play(graph, t, echo=False)
                for t in (DISTRESS, ACTION)]

    distress, action = asyncio.run(main())
    assert distress["emotion"] == "panic" and distress["safety_flag"] is True
    assert action["emotion"] != "panic" and action["safety_flag"] is False
    for state in (distress, action):
        assert isinstance(state["scene"], wf.Scene) and state["narration"]
        assert [m.type for m in state["messages"]] == ["human", "ai"]


def test_prototype_textcat_ranks_anxiety_first(manager):
    nlp = spacy.blank("en")
    nlp.add_pipe("tta_embeddings")
    nlp.add_pipe("tta_textcat", config={"labels": ["anxiety", "sadness", "anger", "joy", "fear", "calm"]})
    doc = nlp(SENTENCE)
    assert max(doc.cats, key=doc.cats.get) == "anxiety", doc.cats
    assert doc.similarity(nlp("I am nervous about my talk")) > doc.similarity(nlp("The dragon guards a pile of gold"))


@needs_structured
def test_spacy_example_ranks_anxiety_first_and_finds_spans_in_the_text(manager):
    nlp = load_example("spacy_pipeline").build_pipeline()
    doc = nlp(SENTENCE)
    assert max(doc.cats, key=doc.cats.get) == "anxiety"
    assert doc.has_vector and doc.similarity(nlp("I am nervous about my talk")) > doc.similarity(
        nlp("The dragon guards a pile of gold"))
    for ent in doc.ents:  # every span is char-aligned and exists in the text
        assert SENTENCE[ent.start_char:ent.end_char] == ent.text and ent.label_ in (
            "EVENT", "EMOTION", "PERSON", "PLACE")


def test_chat_batch_of_8_shares_scheduler_steps(manager):
    from tta_engine.integrations.langchain import ChatTTAEngine

    model = ChatTTAEngine(manager=manager, temperature=0, max_tokens=12, min_new_tokens=12)
    prompts = [f"Name a color for the number {i}." for i in range(8)]
    model.invoke(prompts[0])  # loaded
    before = manager.stats()["smollm2-135m-instruct"]["scheduler_steps"]
    out = model.batch(prompts)
    steps = manager.stats()["smollm2-135m-instruct"]["scheduler_steps"] - before
    assert all(m.usage_metadata["output_tokens"] == 12 for m in out)
    assert steps <= 2 * 11, steps  # sequential decoding would take 8 x 11 steps
