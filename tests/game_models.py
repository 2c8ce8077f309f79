"""The game's structured-output shapes, shared by the end-to-end tests and benchmarks/compare_structured.py:
its Character model (lists and nested objects) and four tools in its ``<tool>``/``<parameters>`` format,
plus prompt generators for both."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

Short = Annotated[str, StringConstraints(max_length=40)]


class Appearance(BaseModel):
    height: str = Field(max_length=40)
    build: str = Field(max_length=40)
    hair: str = Field(max_length=40)
    eyes: str = Field(max_length=40)
    distinguishing_features: list[Short] = Field(max_length=3)


class Skill(BaseModel):
    name: str = Field(max_length=40)
    level: int = Field(ge=1, le=10)


class Item(BaseModel):
    name: str = Field(max_length=40)
    quantity: int = Field(ge=1, le=99)


class Character(BaseModel):
    id: str = Field(max_length=32)
    name: str = Field(max_length=60)
    description: str = Field(max_length=200)
    species: str = Field(max_length=40)
    appearance: Appearance
    personality: list[Short] = Field(max_length=3)
    skills: list[Skill] = Field(max_length=3)
    motivations: list[Short] = Field(max_length=3)
    goals: list[Short] = Field(max_length=3)
    background: str = Field(max_length=200)
    faction: str | None = Field(max_length=60)
    role: Literal["mentor", "ally", "companion", "antagonist", "neutral"]
    inventory: list[Item] = Field(max_length=3)
    health: int = Field(ge=0, le=100)
    status: Literal["healthy", "injured", "tired", "unknown"]
    age: int = Field(ge=0, le=1000)
    occupation: str = Field(max_length=60)


class Move(BaseModel):
    direction: Literal["north", "south", "east", "west"]
    steps: int = Field(ge=1, le=10)


class Speak(BaseModel):
    target: str = Field(max_length=40)
    message: str = Field(max_length=200)


class UseItem(BaseModel):
    item: str = Field(max_length=40)
    target: str | None = Field(default=None, max_length=40)


class Look(BaseModel):
    target: str = Field(max_length=40)


TOOLS: dict[str, type[BaseModel]] = {"move": Move, "speak": Speak, "use_item": UseItem, "look": Look}

_ROLES = ["wise mentor", "loyal companion", "gentle healer", "mysterious stranger", "grumpy blacksmith"]
_SPECIES = ["elf", "human", "dwarf", "talking fox", "forest spirit"]
_PLACES = ["a misty forest", "a harbour town", "a mountain monastery", "a desert market", "a quiet village",
           "a floating library", "a river delta", "a snowy pass", "an old lighthouse", "a garden of stones"]
_ACTIONS = ["walk two steps north", "say hello to the innkeeper", "drink the healing potion",
            "look at the strange statue", "go west", "ask the guard about the gate", "use the lantern on the cave",
            "examine the map", "move east three steps", "tell Mira that I am scared"]


def character_prompts(n: int) -> list[list[dict[str, str]]]:
    fields = ", ".join(Character.model_fields)
    out = []
    for i in range(n):
        role, species, place = _ROLES[i % 5], _SPECIES[(i // 5) % 5], _PLACES[i % 10]
        out.append([
            {"role": "system", "content": "You create characters for a therapeutic text adventure. Reply with "
                                          f"one JSON object with the fields: {fields}."},
            {"role": "user", "content": f"Create a {role} character: a {species} from {place}."},
        ])
    return out


def tool_prompts(n: int) -> list[list[dict[str, str]]]:
    tools = "; ".join(f"{name}({', '.join(m.model_fields)})" for name, m in TOOLS.items())
    out = []
    for i in range(n):
        out.append([
            {"role": "system", "content": "You control the player in a text adventure. Tools: " + tools + ". Answer "
                                          "with exactly one call: <tool>NAME</tool><parameters>{JSON}</parameters>"},
            {"role": "user", "content": f"Turn {i + 1}: I want to {_ACTIONS[i % 10]}."},
        ])
    return out
