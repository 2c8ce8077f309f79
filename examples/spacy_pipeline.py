"""The design note's sentence through a spaCy pipeline on tta-engine (offline, default models):
tta_embeddings (vectors, similarity), tta_textcat (zero-shot emotions by prototypes), tta_entities
(LLM entity extraction under a constrained JSON schema).

Run: python examples/spacy_pipeline.py ["another sentence"]
"""

from __future__ import annotations

import sys

import spacy


def build_pipeline(batch_size: int = 64):
    nlp = spacy.blank("en")  # no downloadable spaCy model needed
    nlp.add_pipe("tta_embeddings", config={"batch_size": batch_size})
    nlp.add_pipe("tta_textcat", config={"labels": ["anxiety", "sadness", "anger", "joy", "fear", "calm"],
                                        "batch_size": batch_size})
    nlp.add_pipe("tta_entities", config={"labels": ["EVENT", "EMOTION", "PERSON", "PLACE"]})
    return nlp


def main(texts: list[str]) -> None:
    nlp = build_pipeline()
    for doc in nlp.pipe(texts):
        top = sorted(doc.cats.items(), key=lambda kv: -kv[1])[:3]
        print(doc.text)
        print("  emotions:", ", ".join(f"{k} {v:.2f}" for k, v in top))
        print("  entities:", [(e.text, e.label_, e.start_char, e.end_char) for e in doc.ents])
        print("  similarity to 'I am nervous about my talk':", round(doc.similarity(nlp("I am nervous about my talk")), 3))


if __name__ == "__main__":
    main(sys.argv[1:] or ["I'm feeling anxious about my upcoming presentation."])
