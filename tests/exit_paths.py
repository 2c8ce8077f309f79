"""A program that runs one engine path and then ends, for tests/test_exit.py (each run is a subprocess).

    python exit_paths.py PATH HOW MODEL CONFIGS_JSON ARTIFACTS_ROOT

PATH: generate | structured | pydantic_ai | guidance | langchain | spacy | midstream (a request still
decoding when the program ends). HOW: return (falls off the end), sys_exit (``sys.exit(3)``), sigterm
(prints READY and waits for the signal, default disposition). MODEL: the causal LM to use.
CONFIGS_JSON: ``{name: raw config}`` for the manager (e.g. the tiny models'), or ``null`` for the
packaged configs.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time

from pydantic import BaseModel, ConfigDict, Field


class Mood(BaseModel):
    model_config = ConfigDict(extra="forbid")
    word: str = Field(max_length=8)
    level: int = Field(ge=0, le=9)


def run(path: str, manager, model: str) -> None:
    chat = [{"role": "user", "content": "How do I feel?"}]
    if path == "generate":
        print(asyncio.run(manager.generate(chat, model, max_tokens=8)))
    elif path == "structured":
        print(asyncio.run(manager.generate_structured(chat, model, Mood, max_tokens=40)))
    elif path == "pydantic_ai":
        from pydantic_ai import Agent
        from tta_engine.integrations.pydantic_ai import TTAEngineModel

        profile = {"supports_json_schema_output": True, "default_structured_output_mode": "native"}
        agent = Agent(TTAEngineModel(model, manager, profile=profile, describe_tools=False), output_type=Mood)
        print(agent.run_sync("How do I feel?").output)
    elif path == "guidance":
        from guidance import gen, select
        from tta_engine.integrations.guidance import TTAEngine

        lm = TTAEngine(model, manager) + "Mood: " + select(["calm", "tense"], name="m") + gen("n", regex="[0-9]{2}")
        print(lm["m"], lm["n"])
    elif path == "langchain":
        from tta_engine.integrations.langchain import ChatTTAEngine

        print(ChatTTAEngine(model=model, manager=manager, max_tokens=40).with_structured_output(Mood).invoke("Mood?"))
    elif path == "spacy":
        import spacy

        nlp = spacy.blank("en")
        nlp.add_pipe("tta_entities", config={"model": model, "labels": ["PLACE"], "max_tokens": 40, "max_entities": 1})
        print(nlp("The lantern in the forest.").ents)
    elif path == "midstream":  # a long request decoding on the scheduler thread while the program ends
        started = threading.Event()

        def stream():
            async def main():
                async for _ in manager.astream(chat, model, max_tokens=200, min_new_tokens=200):
                    started.set()
            asyncio.run(main())

        threading.Thread(target=stream, daemon=True).start()
        started.wait(60)
        time.sleep(0.05)
        print("decoding")
    else:
        raise SystemExit(f"unknown path {path!r}")


def main() -> None:
    path, how, model, configs, root = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
    from tta_engine.integrations.common import set_default_manager
    from tta_engine.manager import TransformersModelManager

    manager = TransformersModelManager(configs, artifacts_root=root)
    set_default_manager(manager)  # spaCy components find the manager here
    run(path, manager, model)
    sys.stdout.flush()
    if how == "sys_exit":
        sys.exit(3)
    if how == "sigterm":
        print("READY", flush=True)
        time.sleep(60)


if __name__ == "__main__":
    main()
