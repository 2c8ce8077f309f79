"""Label classification on the engine, shared by the spaCy textcat and the LangGraph classifier node:
zero-shot by nearest label prototypes in embedding space, or the LLM's answer under constrained
``choice`` decoding (the reply can only be one of the labels)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import TTAEngineError

# Zero-shot prototypes of the game's emotion labels: a label's vector is the mean of its phrases'.
EMOTION_PROTOTYPES: dict[str, list[str]] = {
    "anxiety": ["I feel anxious and nervous.", "I'm worried about what will happen.",
                "My stomach is in knots before the big day."],
    "sadness": ["I feel sad and down.", "I miss them so much it hurts.", "Everything feels empty and grey."],
    "anger": ["I am so angry right now.", "This is unfair and it makes me furious.",
              "I want to shout at them."],
    "joy": ["I feel happy and excited!", "This is wonderful, I love it.", "What a great day, I'm delighted."],
    "fear": ["I'm scared something terrible is coming.", "I am terrified of the dark.",
             "Something is chasing me and I'm frightened."],
    "calm": ["I feel calm and relaxed.", "Everything is peaceful and quiet.", "I'm at ease and content."],
}

DEFAULT_CHOICE_INSTRUCTION = "Classify the user's message. Answer with exactly one of: {labels}."


def check_labels(labels: Sequence[str]) -> list[str]:
    labels = [str(x) for x in labels]
    if not labels:
        raise TTAEngineError("at least one label is needed: configure labels (or prototypes)")
    if len(set(labels)) != len(labels):
        raise TTAEngineError(f"labels must be distinct, got {labels}")
    return labels


class PrototypeClassifier:
    """Scores = softmax(scale * cosine(text, label centroid)); a label's centroid is the normalized mean
    of its prototype phrases' embeddings (configured, the built-in emotion ones, or the label itself)."""

    def __init__(self, manager: Any, model: str, labels: Sequence[str],
                 prototypes: Mapping[str, Sequence[str]] | None = None, scale: float = 20.0):
        self.manager, self.model, self.scale = manager, model, float(scale)
        self.prototypes = {k: list(v) for k, v in (prototypes or {}).items()}
        self.labels = check_labels(labels or list(self.prototypes) or list(EMOTION_PROTOTYPES))
        self._centroids: np.ndarray | None = None

    def phrases(self, label: str) -> list[str]:
        return list(self.prototypes.get(label) or EMOTION_PROTOTYPES.get(label) or [label])

    def centroids(self) -> np.ndarray:
        if self._centroids is None:
            rows = []
            for label in self.labels:
                c = self.manager.embed(self.phrases(label), self.model).mean(axis=0)
                rows.append(c / (np.linalg.norm(c) or 1.0))
            self._centroids = np.stack(rows)
        return self._centroids

    def scores_of_vectors(self, vectors: np.ndarray) -> list[dict[str, float]]:
        v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        sims = v @ self.centroids().T
        z = np.exp(self.scale * (sims - sims.max(axis=1, keepdims=True)))
        probs = z / z.sum(axis=1, keepdims=True)
        return [dict(zip(self.labels, map(float, p), strict=True)) for p in probs]

    def scores(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """One embed call for all ``texts``."""
        return self.scores_of_vectors(self.manager.embed(list(texts), self.model))


async def choose_labels(manager: Any, model: str, texts: Sequence[str], labels: Sequence[str],
                        instruction: str = DEFAULT_CHOICE_INSTRUCTION) -> list[str]:
    """The LLM's label for each text (concurrent requests, decoded in shared scheduler steps), each
    constrained to be one of ``labels``."""
    labels = check_labels(labels)
    fmt = {"type": "choice", "choices": labels}
    system = instruction.format(labels=", ".join(labels))

    async def one(text: str) -> str:
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        return (await manager.generate(msgs, model, response_format=fmt, temperature=0, max_tokens=32)).strip()

    return list(await asyncio.gather(*(one(t) for t in texts)))
