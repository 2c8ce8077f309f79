"""The design note's breathing-exercise template, in current guidance syntax, on tta-engine's default model.

    python examples/guidance_breathing.py
"""

from __future__ import annotations

import guidance
from guidance import assistant, gen, select, system, user
from tta_engine.integrations.guidance import TTAEngine, engine_of

TECHNIQUES = ["box breathing", "4-7-8 breathing", "belly breathing"]


@guidance
def breathing_exercise(lm, feeling: str, steps: int = 3):
    with system():
        lm += "You are a calm guide in a therapeutic text adventure. You lead short breathing exercises."
    with user():
        lm += f"I feel {feeling}. Guide me through a breathing exercise."
    with assistant():
        lm += "Let's try " + select(TECHNIQUES, name="technique") + ".\n"
        for i in range(1, steps + 1):
            lm += f"Step {i}: " + gen(f"step{i}", max_tokens=30, stop="\n") + "\n"
        lm += "Breathe in for " + gen("inhale", regex=r"[2-8]") + " seconds."
    return lm


def main(feeling: str = "anxious", model: str = "smollm2-135m-instruct", manager=None):
    lm = TTAEngine(model, manager) + breathing_exercise(feeling)
    return lm


if __name__ == "__main__":
    out = main()
    print(str(out))
    print("technique:", out["technique"], "| KV:", engine_of(out).stats)
