"""The Pydantic-AI and Guidance examples end to end on the default model (SmolLM2-135M-Instruct int4),
through the process-wide default manager the examples use (artifacts exported on demand)."""

from __future__ import annotations

import json
import re

import pytest
from helpers import load_example

pytestmark = pytest.mark.e2e
pytest.importorskip("pydantic_ai")
pytest.importorskip("guidance")
PROMPTS = ["Create a wise mentor character", "Create a shy forest spirit", "Create a retired knight",
           "Create a cheerful baker", "Create a lighthouse keeper", "Create a young healer",
           "Create a wandering bard", "Create a calm river guide", "Create an old librarian",
           "Create a gentle dragon"]


@pytest.fixture(scope="module")
def manager(default_manager):
    return default_manager  # installed as the examples' process-wide default manager


def test_character_agent_validates_10_of_10(manager):
    ex = load_example("pydantic_character")
    agent = ex.make_agent(manager=manager)
    for prompt in PROMPTS:
        out = agent.run_sync(prompt).output
        assert isinstance(out, ex.Character) and out.goal.strip()


def test_game_tools_agent_calls_its_tools(manager):
    ex = load_example("pydantic_game_tools")
    result, calls = ex.main(manager=manager)
    assert calls and {c[0] for c in calls} <= {"look_up_location", "roll_calming_check"}
    assert isinstance(result.output, str)


def test_breathing_template_and_select_json_program(manager):
    ex = load_example("guidance_breathing")
    lm = ex.main(manager=manager)
    assert lm["technique"] in ex.TECHNIQUES and re.fullmatch(r"[2-8]", lm["inhale"])

    import guidance
    from guidance import select
    from pydantic import BaseModel, ConfigDict, Field
    from tta_engine.integrations.guidance import TTAEngine

    class Room(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str = Field(max_length=30)
        calm: int = Field(ge=0, le=10)

    lm = TTAEngine("smollm2-135m-instruct", manager)
    out = lm + "Mood: " + select(["calm", "tense"], name="mood") + "\nRoom: " + guidance.json(name="room", schema=Room)
    assert out["mood"] in ("calm", "tense")
    Room.model_validate(json.loads(out["room"]))
