"""LangGraph nodes for the game on the engine: a typed game state, a classifier node (constrained
``choice`` decoding, or nearest label prototypes in embedding space), a narrator node (streams its text;
``graph.astream(..., stream_mode="messages")`` sees every token), a structured-extraction node (a state
field <- a validated Pydantic instance) and conditional routing on a label.
Needs ``pip install 'tta-engine[langchain]'``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any, TypedDict

from .classify import DEFAULT_CHOICE_INSTRUCTION, PrototypeClassifier, check_labels, choose_labels
from .common import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL, default_manager, require

require("langgraph", "langchain")

from langchain_core.messages import (  # noqa: E402
    AIMessage,
    AnyMessage,
    HumanMessage,
    SystemMessage,
    message_chunk_to_message,
)
from langgraph.graph.message import add_messages  # noqa: E402
from pydantic import BaseModel  # noqa: E402

__all__ = ["GameState", "classifier_node", "extraction_node", "narrator_node", "route_on"]

Node = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]


class GameState(TypedDict, total=False):
    """The state a TTA turn flows through."""

    messages: Annotated[list[AnyMessage], add_messages]  # the conversation (appended to by nodes)
    player_input: str
    emotion: str | None  # the classifier's label
    emotion_scores: dict[str, float]  # per label (prototype mode: softmax of cosine; choice mode: 1/0)
    safety_flag: bool  # the label is one of the classifier's flag labels (high distress)
    narration: str  # the last narrator node's text
    scene: Any  # the structured scene (a Pydantic instance)


def classifier_node(labels: Sequence[str], *, mode: str = "prototype", manager: Any = None,
                    embedding_model: str = DEFAULT_EMBEDDING_MODEL, llm_model: str = DEFAULT_CHAT_MODEL,
                    prototypes: Mapping[str, Sequence[str]] | None = None, scale: float = 20.0,
                    instruction: str = DEFAULT_CHOICE_INSTRUCTION, input_key: str = "player_input",
                    output_key: str = "emotion", scores_key: str = "emotion_scores",
                    flag_labels: Sequence[str] = (), flag_key: str = "safety_flag") -> Node:
    """A node that labels ``state[input_key]``: ``mode="prototype"`` picks the label whose prototype
    phrases are nearest in embedding space; ``mode="choice"`` asks the LLM, its reply constrained to one
    of ``labels``. Writes the label, the scores and ``flag_key`` (label in ``flag_labels``)."""
    labels = check_labels(labels)
    if mode not in ("prototype", "choice"):
        raise ValueError(f"classifier mode {mode!r} is not supported; use 'prototype' or 'choice'")
    unknown = set(flag_labels) - set(labels)
    if unknown:
        raise ValueError(f"flag labels {sorted(unknown)} are not among the labels {labels}")
    protos = PrototypeClassifier(None, embedding_model, labels, prototypes, scale) if mode == "prototype" else None

    async def classify(state: Mapping[str, Any]) -> dict[str, Any]:
        m = manager if manager is not None else default_manager()
        text = state[input_key]
        if protos is not None:
            protos.manager = m
            scores = (await asyncio.to_thread(protos.scores, [text]))[0]
            label = max(scores, key=scores.get)
        else:
            label = (await choose_labels(m, llm_model, [text], labels, instruction))[0]
            scores = {lab: float(lab == label) for lab in labels}
        return {output_key: label, scores_key: scores, flag_key: label in flag_labels}

    return classify


def _history(state: Mapping[str, Any], system_prompt: str, input_key: str) -> tuple[list[AnyMessage], list]:
    """(the prompt: system + conversation + the player's input, the messages to add to the state)."""
    msgs: list[AnyMessage] = [SystemMessage(system_prompt), *state.get("messages", [])]
    text = state.get(input_key)
    added = []
    if text and not (isinstance(msgs[-1], HumanMessage) and msgs[-1].content == text):
        added = [HumanMessage(text)]
    return msgs + added, added


def narrator_node(chat_model: Any, system_prompt: str, *, input_key: str = "player_input",
                  output_key: str = "narration") -> Node:
    """A node that continues the story (or guides an exercise) from the conversation and the player's
    input. It streams through the chat model, so ``graph.astream(..., stream_mode="messages")`` yields
    each token as it is decoded; the node adds the player's and the narrator's messages to the state."""

    async def narrate(state: Mapping[str, Any]) -> dict[str, Any]:
        msgs, added = _history(state, system_prompt, input_key)
        full = None
        async for chunk in chat_model.astream(msgs):
            full = chunk if full is None else full + chunk
        # the state's message keeps the streamed chunks' id, so stream_mode="messages" does not repeat it
        reply = message_chunk_to_message(full) if full is not None else AIMessage("")
        return {output_key: reply.text, "messages": [*added, reply]}

    return narrate


def extraction_node(chat_model: Any, schema: type[BaseModel], *, output_key: str = "scene",
                    instruction: str = "Update the scene from the story so far.",
                    source_key: str | None = "narration") -> Node:
    """A node that fills ``state[output_key]`` with a validated ``schema`` instance, decoded under the
    schema's grammar (``with_structured_output``), from ``state[source_key]`` (or the conversation)."""
    structured = chat_model.with_structured_output(schema)

    async def extract(state: Mapping[str, Any]) -> dict[str, Any]:
        source = state.get(source_key) if source_key else None
        if source:
            msgs = [SystemMessage(instruction), HumanMessage(source)]
        else:
            msgs = [SystemMessage(instruction), *state.get("messages", [])]
        return {output_key: await structured.ainvoke(msgs)}

    return extract


def route_on(key: str, routes: Mapping[Any, str], default: str | None = None) -> Callable[[Mapping[str, Any]], str]:
    """A routing function for ``add_conditional_edges``: the node named by ``routes[state[key]]``
    (``default`` for any other value)."""

    def route(state: Mapping[str, Any]) -> str:
        value = state.get(key)
        if value in routes:
            return routes[value]
        if default is None:
            raise ValueError(f"no route for {key}={value!r}; routes: {dict(routes)}")
        return default

    return route
