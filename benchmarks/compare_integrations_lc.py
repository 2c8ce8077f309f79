"""LangChain / LangGraph / spaCy integration figures (issue 14), measured in one run on the default models:

1. ChatTTAEngine.batch of 8 / 8 sequential invoke, wall time                      (target <= 0.5)
2. nlp.pipe of 1,000 sentences through tta_embeddings: sentences/s / manager.embed  (target >= 0.9)
3. zero-shot tta_textcat (prototypes) accuracy on a 40-sentence labelled emotion set (report)
4. examples/langgraph_workflow.py end-to-end latency per turn, p50                  (report)

    python benchmarks/compare_integrations_lc.py [--new-tokens 48] [--turns 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import spacy
from tta_engine.integrations.common import set_default_manager
from tta_engine.integrations.langchain import ChatTTAEngine
from tta_engine.manager import TransformersModelManager

LM, EMB = "smollm2-135m-instruct", "all-minilm-l6-v2"
ROOT = Path(__file__).resolve().parent.parent

# 40 sentences, 8 per label, written for this benchmark (none is a prototype phrase of the textcat).
EMOTION_SET = [
    ("anxiety", "I keep worrying that I will fail the exam tomorrow."),
    ("anxiety", "My hands are sweating before the job interview."),
    ("anxiety", "What if nobody comes to my party?"),
    ("anxiety", "I can't stop thinking about all the things that could go wrong."),
    ("anxiety", "I'm nervous about meeting her parents this weekend."),
    ("anxiety", "My heart races whenever my phone rings."),
    ("anxiety", "I'm uneasy about the results of the medical test."),
    ("anxiety", "I lie awake at night worrying about money."),
    ("sadness", "My dog died last week and the house feels empty."),
    ("sadness", "I cried all evening after we said goodbye."),
    ("sadness", "Nobody remembered my birthday this year."),
    ("sadness", "I feel so alone since my best friend moved away."),
    ("sadness", "The rain matches how heavy my heart feels."),
    ("sadness", "I lost my grandmother and I miss her every day."),
    ("sadness", "Nothing seems to bring me joy anymore."),
    ("sadness", "I was left out again and it hurts."),
    ("anger", "He lied to my face and I'm furious."),
    ("anger", "Stop interrupting me, it drives me mad!"),
    ("anger", "They cancelled my flight without any notice and I am livid."),
    ("anger", "I'm sick of being treated like an idiot."),
    ("anger", "How dare you read my private messages!"),
    ("anger", "The neighbours blasted music all night and I want to scream at them."),
    ("anger", "It is outrageous that they fired her for no reason."),
    ("anger", "I slammed the door because I was so annoyed."),
    ("joy", "I got the job and I can't stop smiling!"),
    ("joy", "We're having a baby and I'm over the moon."),
    ("joy", "The sun is out and I'm dancing in the kitchen."),
    ("joy", "My team won the championship, best day ever!"),
    ("joy", "I passed my driving test on the first try!"),
    ("joy", "Her surprise visit made me so happy."),
    ("joy", "I laughed so hard with my friends tonight."),
    ("joy", "Finally on holiday, this feels amazing."),
    ("calm", "I'm sitting on the porch watching the sunset, completely at peace."),
    ("calm", "A slow walk in the garden left me relaxed."),
    ("calm", "I breathe slowly and feel my shoulders loosen."),
    ("calm", "The lake is still and so is my mind."),
    ("calm", "I'm curled up with tea and a book, content."),
    ("calm", "After the yoga class I feel serene."),
    ("calm", "Listening to the soft rain makes me tranquil."),
    ("calm", "Everything is quiet and I feel safe."),
]
LABELS = ["anxiety", "sadness", "anger", "joy", "calm"]


def batch_vs_sequential(manager, new_tokens: int) -> dict:
    model = ChatTTAEngine(manager=manager, temperature=0, max_tokens=new_tokens, min_new_tokens=new_tokens)
    prompts = [f"Tell me a short calming story about place number {i}." for i in range(8)]
    model.batch(prompts[:2])  # warm-up (load, compile)
    t0 = time.perf_counter()
    seq = [model.invoke(p) for p in prompts]
    t_seq = time.perf_counter() - t0
    steps0 = manager.stats()[LM]["scheduler_steps"]
    t0 = time.perf_counter()
    bat = model.batch(prompts)
    t_bat = time.perf_counter() - t0
    steps = manager.stats()[LM]["scheduler_steps"] - steps0
    assert all(m.usage_metadata["output_tokens"] == new_tokens for m in seq + bat)
    return {"sequential_s": t_seq, "batch_s": t_bat, "ratio": t_bat / t_seq, "batch_scheduler_steps": steps,
            "tokens_per_request": new_tokens}


def pipe_vs_embed(n: int) -> dict:
    subjects = ["The traveller", "A small fox", "The old miller", "My sister", "The lantern", "A quiet wind",
                "The baker", "An owl", "The river", "Our guide"]
    verbs = ["walks past", "looks at", "dreams of", "sings about", "waits near", "talks to", "remembers"]
    objects = ["the bridge", "the dark forest", "a warm fire", "the tower at dawn", "the misty marsh",
               "the village square", "a broken cart", "the silver moon", "the mountain pass", "a quiet pond",
               "the mill", "the sea", "an open door", "the market"]
    texts = [f"{subjects[i % 10]} {verbs[i % 7]} {objects[i % 14]} ({i})." for i in range(n)]
    res = {}
    for label in ("embed", "pipe", "embed2", "pipe2"):  # interleaved, twice: the machine is shared
        m = TransformersModelManager(None, embedding_cache_size=1)  # no cache hits: every text is encoded
        m.embed(["warm-up"], EMB)
        set_default_manager(m)
        nlp = spacy.blank("en")
        nlp.add_pipe("tta_embeddings", config={"batch_size": 256})
        t0 = time.perf_counter()
        if label.startswith("embed"):
            m.embed(texts, EMB)
        else:
            docs = list(nlp.pipe(texts))
            assert docs[-1].has_vector
        res[label] = n / (time.perf_counter() - t0)
        m.close()
    embed, pipe = max(res["embed"], res["embed2"]), max(res["pipe"], res["pipe2"])
    return {"sentences": n, "embed_per_s": embed, "pipe_per_s": pipe, "ratio": pipe / embed}


def textcat_accuracy(manager) -> dict:
    set_default_manager(manager)
    nlp = spacy.blank("en")
    nlp.add_pipe("tta_textcat", config={"labels": LABELS})
    correct, confusion = 0, {}
    for (gold, _), doc in zip(EMOTION_SET, nlp.pipe([t for _, t in EMOTION_SET]), strict=True):
        pred = max(doc.cats, key=doc.cats.get)
        correct += pred == gold
        if pred != gold:
            confusion[f"{gold}->{pred}"] = confusion.get(f"{gold}->{pred}", 0) + 1
    return {"accuracy": correct / len(EMOTION_SET), "n": len(EMOTION_SET), "errors": confusion}


def workflow_latency(manager, turns: int) -> dict:
    spec = importlib.util.spec_from_file_location("wf", ROOT / "examples" / "langgraph_workflow.py")
    wf = sys.modules["wf"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wf)
    scene = importlib.util.find_spec("tta_engine.structured") is not None  # the scene step needs it
    graph = wf.build_workflow(manager, scene=scene)
    inputs = ["I can't breathe, everything is too much", "I open the old door"]

    async def main():
        await wf.play(graph, inputs[1], echo=False)  # warm-up
        out = []
        for i in range(turns):
            t0 = time.perf_counter()
            state = await wf.play(graph, inputs[i % 2], echo=False)
            out.append((time.perf_counter() - t0, state["emotion"]))
        return out

    runs = asyncio.run(main())
    lat = [t for t, _ in runs]
    return {"turns": turns, "with_scene_update": scene, "p50_s": statistics.median(lat), "min_s": min(lat), "max_s": max(lat),
            "labels": [e for _, e in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    manager = TransformersModelManager(None)
    res = {"batch": batch_vs_sequential(manager, args.new_tokens)}
    print(f"ChatTTAEngine.batch(8) {res['batch']['batch_s']:.2f}s vs 8 x invoke {res['batch']['sequential_s']:.2f}s: "
          f"ratio {res['batch']['ratio']:.3f} (target <= 0.5), {res['batch']['batch_scheduler_steps']} scheduler steps",
          flush=True)
    res["textcat"] = textcat_accuracy(manager)
    print(f"tta_textcat prototypes: accuracy {res['textcat']['accuracy']:.3f} on {res['textcat']['n']} "
          f"sentences; errors {res['textcat']['errors']}", flush=True)
    res["workflow"] = workflow_latency(manager, args.turns)
    print(f"workflow turn (scene update: {res['workflow']['with_scene_update']}) p50 {res['workflow']['p50_s']:.2f}s (min {res['workflow']['min_s']:.2f}, max "
          f"{res['workflow']['max_s']:.2f}); labels {res['workflow']['labels']}", flush=True)
    manager.close()
    res["pipe"] = pipe_vs_embed(args.sentences)
    print(f"nlp.pipe {res['pipe']['pipe_per_s']:.0f} sentences/s vs manager.embed {res['pipe']['embed_per_s']:.0f}: "
          f"ratio {res['pipe']['ratio']:.3f} (target >= 0.9)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
