"""A TTA turn as a LangGraph workflow on tta-engine (offline, default models):

    player input -> emotion classification (prototypes in embedding space)
                 -> grounding exercise (high distress)  |  narrative continuation
                 -> structured scene update (a validated Scene, decoded under its JSON schema)

Run: python examples/langgraph_workflow.py ["I open the old door"]
The narrator's tokens stream as they are decoded (graph.astream(..., stream_mode="messages")).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Literal

from langchain_core.messages import AIMessageChunk
from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel, Field
from tta_engine.integrations.langchain import ChatTTAEngine
from tta_engine.integrations.langgraph import (
    GameState,
    classifier_node,
    extraction_node,
    narrator_node,
    route_on,
)

# Label prototypes: a label wins when the player's words are nearest to its phrases' mean embedding.
EMOTIONS = {
    "panic": ["I'm having a panic attack.", "My chest is tight and I can't catch my breath.",
              "It's all too overwhelming, I can't cope anymore.", "I'm shaking and I feel like I'm going to faint."],
    "anxiety": ["I feel anxious and nervous.", "I'm worried about what will happen next."],
    "sadness": ["I feel sad and lonely.", "I miss my home."],
    "curiosity": ["I walk down the path to see where it leads.", "I pick up the lantern and look around.",
                  "I knock on the wooden gate.", "I climb the stairs to the tower."],
    "calm": ["I sit by the river and relax.", "I feel peaceful and safe here."],
}


class Scene(BaseModel):
    location: str = Field(description="where the player is now, a few words", max_length=40)
    mood: Literal["calm", "tense", "mysterious", "hopeful", "somber"]
    summary: str = Field(description="one short sentence", max_length=120)


GROUNDING = ("You are a gentle guide in a therapeutic text adventure. The player is overwhelmed. Pause the "
             "story and lead a short 5-4-3-2-1 grounding exercise: five things they can see, four they can "
             "touch, three they can hear. Speak calmly, in two or three short sentences.")
NARRATOR = ("You are the narrator of a gentle fantasy text adventure. Continue the story from the player's "
            "action in two or three vivid sentences, in the second person.")


def build_workflow(manager=None, *, chat_model: str = "smollm2-135m-instruct",
                   embedding_model: str = "all-minilm-l6-v2", max_tokens: int = 64, scene: bool = True):
    """The compiled graph. ``manager`` defaults to the process-wide TransformersModelManager;
    ``scene=False`` ends the turn after the narrator (no structured scene update)."""
    llm = ChatTTAEngine(model=chat_model, manager=manager, temperature=0, max_tokens=max_tokens)
    scene_llm = ChatTTAEngine(model=chat_model, manager=manager, temperature=0, max_tokens=128)
    g = StateGraph(GameState)
    g.add_node("classify", classifier_node(list(EMOTIONS), prototypes=EMOTIONS, manager=manager,
                                           embedding_model=embedding_model, flag_labels=["panic"]))
    g.add_node("grounding", narrator_node(llm, GROUNDING))
    g.add_node("narrate", narrator_node(llm, NARRATOR))
    g.add_edge(START, "classify")
    g.add_conditional_edges("classify", route_on("safety_flag", {True: "grounding"}, default="narrate"),
                            ["grounding", "narrate"])
    last = END
    if scene:
        g.add_node("update_scene", extraction_node(scene_llm, Scene, instruction=(
            "Describe the scene of this passage of a text adventure as JSON: location, mood, summary.")))
        g.add_edge("update_scene", END)
        last = "update_scene"
    g.add_edge("grounding", last)
    g.add_edge("narrate", last)
    return g.compile()


async def play(graph, player_input: str, *, echo: bool = True) -> dict:
    """One turn; prints the narrator's tokens as they stream, returns the final state."""
    state: dict = {}
    async for mode, item in graph.astream({"player_input": player_input}, stream_mode=["messages", "values"]):
        if mode == "messages":
            chunk, meta = item
            if echo and meta.get("langgraph_node") in ("grounding", "narrate") and isinstance(chunk, AIMessageChunk):
                print(chunk.content, end="", flush=True)
        else:
            state = item
    if echo:
        print()
    return state


async def main(inputs: list[str]) -> None:
    graph = build_workflow()
    for text in inputs:
        print(f"> {text}")
        state = await play(graph, text)
        print(f"  emotion={state['emotion']} safety_flag={state['safety_flag']}")
        print(f"  scene={state.get('scene')!r}\n")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:] or ["I can't breathe, everything is too much", "I open the old door"]))
