"""A Pydantic-AI character generator on tta-engine with a validation hook: the output validator rejects a
character without a goal, which makes the agent ask the model again (a retry).

    python examples/pydantic_character.py
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic_ai import Agent, ModelRetry
from tta_engine.integrations.pydantic_ai import TTAEngineModel


class Character(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=40)
    role: str = Field(max_length=60)
    personality: str = Field(max_length=120)
    goal: str = Field(max_length=120)


def make_agent(model: str = "smollm2-135m-instruct", manager=None) -> Agent:
    agent = Agent(TTAEngineModel(model, manager), output_type=Character, retries=2,
                  instructions="You create characters for a calm, therapeutic fantasy adventure.",
                  model_settings={"max_tokens": 200, "temperature": 0.7, "seed": 1})

    @agent.output_validator
    def needs_a_goal(character: Character) -> Character:
        if not character.goal.strip():
            raise ModelRetry("The character has no goal: give them a clear goal.")
        return character

    return agent


def main(prompt: str = "Create a wise mentor character", **kwargs) -> Character:
    return make_agent(**kwargs).run_sync(prompt).output


if __name__ == "__main__":
    print(main().model_dump_json(indent=2))
