"""The benchmark's texts: the chat prompt (system prompt + world state + an action), the long running
text for the context sweep, and the embedding corpus."""

from __future__ import annotations

SYSTEM_PROMPT = (
    "You are the narrator of a calm, therapeutic text adventure. Describe the world in gentle, concrete "
    "sensory detail, in the second person, in at most three short paragraphs. Never rush the player, "
    "never judge their choices, and offer one small grounding suggestion when they seem stressed. Keep "
    "the story consistent with the world state below."
)
WORLD_STATE = (
    "World state. Location: the Lantern Grove, a clearing of old cedars at dusk, a slow stream to the "
    "east, a stone bench under a willow, fireflies beginning to rise. Time: early evening, day 3. Player: Robin, a tired "
    "traveller who has been sleeping badly; mood: anxious but curious. Inventory: a "
    "brass lantern (lit), a worn notebook, a flask of chamomile tea, three smooth river "
    "stones, a letter from an old friend. Companions: Moss, a quiet grey fox who follows at a "
    "distance. Known characters: Elder Wren, a patient mentor who lives in the mill upstream. Recent events: "
    "Robin crossed the rope bridge despite a fear of heights and decided to rest before the climb to the "
    "mill. Open threads: the unopened letter; a strange bell heard at noon."
)
USER_ACTION = "I sit on the stone bench, take out the letter and hold it for a while without opening it."
STREAM_ACTIONS = (
    USER_ACTION,
    "I follow Moss along the stream and listen to the water.",
    "I pour a cup of chamomile tea and breathe slowly.",
    "I write three things I am grateful for in the notebook.",
    "I walk towards the mill to find Elder Wren.",
    "I skip one of the river stones across the stream.",
    "I ask Moss where the bell sound came from.",
    "I lie down on the grass and watch the fireflies.",
)


def bench_messages(action: str = USER_ACTION) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT + "\n\n" + WORLD_STATE},
            {"role": "user", "content": action}]


def chat_prompt_ids(tokenizer, max_tokens: int, action: str = USER_ACTION) -> list[int]:
    """The benchmark's chat prompt (system + world state + action) through the chat template, at most
    ``max_tokens`` tokens (the end is kept, so the generation prompt is always there)."""
    from tta_engine.tokenizer import as_tokenizer

    ids = as_tokenizer(tokenizer).apply_chat_template(bench_messages(action), add_generation_prompt=True)
    return ids[-max_tokens:]


def long_prompt_ids(tokenizer, length: int) -> list[int]:
    """``length`` token ids of running text (the world state repeated), for the context-length sweep."""
    base = list(tokenizer(WORLD_STATE + " " + SYSTEM_PROMPT + " ")["input_ids"])
    reps = length // max(len(base), 1) + 1
    return (base * reps)[:length]


_SUBJECTS = ("The lantern", "A quiet fox", "Elder Wren", "The old ferry", "A cold wind", "My heart",
             "The river", "Tamsin", "The letter", "A distant bell", "The mill wheel", "Soft rain")
_VERBS = ("flickers near", "waits beside", "hums about", "drifts over", "feels heavy after", "glows under",
          "rests against", "sings to", "hides behind", "calls across")
_OBJECTS = ("the stone bench", "the willow", "the rope bridge", "the cedar grove", "a sleepless night",
            "the slow stream", "the empty den", "my worried thoughts", "the path to the mill")
_TAILS = ("", " while I try to breathe slowly", ", and I wonder whether tomorrow will be easier",
          " as the fireflies rise one by one over the dark water and the evening settles in",
          " and I notice that my shoulders are tense")


def embedding_corpus(n: int) -> list[str]:
    """``n`` deterministic sentences of varied length (game-like text)."""
    out = []
    for i in range(n):
        s = (f"{_SUBJECTS[i % len(_SUBJECTS)]} {_VERBS[(i // 3) % len(_VERBS)]} "
             f"{_OBJECTS[(i // 7) % len(_OBJECTS)]}{_TAILS[(i // 5) % len(_TAILS)]}.")
        out.append(s)
    return out


SINGLE_QUERY = "I feel anxious about opening the letter."
