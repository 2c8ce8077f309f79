"""A Pydantic-AI agent on tta-engine with two game tools -- look up a location, roll a calming check --
that it calls (through the constrained tool-call grammar, so calls always parse) and uses in its answer.

    python examples/pydantic_game_tools.py
"""

from __future__ import annotations

import random
from typing import Annotated

from pydantic import Field
from pydantic_ai import Agent
from tta_engine.integrations.pydantic_ai import TTAEngineModel

LOCATIONS = {
    "forest": "A quiet forest of tall pines; a stream murmurs nearby.",
    "lake": "A still lake under the moon; reeds sway at the shore.",
    "village": "A small village square with a warm bakery and a well.",
}


def make_agent(model: str = "smollm2-135m-instruct", manager=None, seed: int = 0) -> tuple[Agent, list]:
    calls: list[tuple[str, dict]] = []
    rng = random.Random(seed)
    agent = Agent(TTAEngineModel(model, manager),
                  instructions="You narrate a calm text adventure. Use the tools to look up places and to "
                               "roll calming checks, then describe the result in one or two sentences.",
                  model_settings={"max_tokens": 120, "temperature": 0})

    @agent.tool_plain
    def look_up_location(name: Annotated[str, Field(max_length=20)]) -> str:
        """Describe a location of the game world (forest, lake or village)."""
        calls.append(("look_up_location", {"name": name}))
        return LOCATIONS.get(name.strip().lower(), f"No place called {name!r}; known: {', '.join(LOCATIONS)}.")

    @agent.tool_plain
    def roll_calming_check(difficulty: Annotated[int, Field(ge=1, le=20)]) -> str:
        """Roll a d20 calming check against a difficulty from 1 to 20."""
        roll = rng.randint(1, 20)
        calls.append(("roll_calming_check", {"difficulty": difficulty, "roll": roll}))
        return f"rolled {roll} vs {difficulty}: {'success' if roll >= difficulty else 'not yet'}"

    return agent, calls


def main(prompt: str = "I walk to the lake and try to calm my breathing.", **kwargs):
    agent, calls = make_agent(**kwargs)

    def settings(ctx):  # call a tool first, then call more or answer; answer by the fourth step
        return {"tool_choice": "required" if ctx.run_step <= 1 else ("auto" if ctx.run_step <= 3 else "none")}

    result = agent.run_sync(prompt, model_settings=settings)
    return result, calls


if __name__ == "__main__":
    result, calls = main()
    print("tool calls:", calls)
    print(result.output)
