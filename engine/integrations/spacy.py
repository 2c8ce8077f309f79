"""spaCy components on the engine, registered as factories (entry points ``spacy_factories``, so
``nlp.add_pipe("tta_embeddings")`` works once tta-engine is installed):

- ``tta_embeddings``: Doc, Span and Token vectors and ``similarity`` from the engine's sentence encoder,
  through spaCy's user hooks (Doc vectors of a batch come from one embed call).
- ``tta_textcat``: ``doc.cats`` for configured labels, zero-shot by nearest label prototypes in
  embedding space (``mode = "prototype"``) or chosen by the LLM under constrained ``choice`` decoding
  (``mode = "llm"``; one concurrent LLM request per doc of a batch).
- ``tta_entities``: LLM entity extraction under a constrained JSON schema whose span texts can only be
  token n-grams of the doc, aligned with ``doc.char_span`` and written to ``doc.ents`` (never over an
  existing entity) or ``doc.spans[spans_key]``.

Each is configured through spaCy's config system (model names, labels, batch size) and runs on the
process-wide manager (``tta_engine.integrations.common.set_default_manager`` shares the game's).
Needs ``pip install 'tta-engine[spacy]'``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import numpy as np

from ..errors import StructuredOutputError, TTAEngineError
from .classify import DEFAULT_CHOICE_INSTRUCTION, PrototypeClassifier, choose_labels
from .common import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL, default_manager, require, run_sync

require("spacy", "spacy")

from spacy.language import Language  # noqa: E402
from spacy.tokens import Doc, Span  # noqa: E402
from spacy.util import filter_spans, raise_error  # noqa: E402

__all__ = ["EngineEmbeddings", "EngineEntities", "EngineTextCategorizer"]

def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _batch_size(component, given: int | None) -> int:
    """Docs per engine call: the component's configured ``batch_size``, or the smaller one ``nlp.pipe``
    passes (spaCy passes its own, 1000 by default, to every component)."""
    return min(given, component.batch_size) if given else component.batch_size


def _manager(component) -> Any:
    return component.manager if component.manager is not None else default_manager()


class _Component:
    """spaCy's error-handling convention (``nlp.set_error_handler``; TrainablePipe's): a failure goes to
    ``error_handler(name, component, docs, exc)`` (default: raise). When a batch fails, its docs are
    retried one by one so that only the failing docs reach the handler (and are left out of the
    stream, as spaCy's own components leave out a failed batch); the others are annotated and go on.
    Subclasses define ``_annotate(docs)``."""

    name: str
    batch_size: int
    _error_handler = staticmethod(raise_error)

    def set_error_handler(self, error_handler) -> None:
        self._error_handler = error_handler

    def get_error_handler(self):
        return self._error_handler

    def _annotate(self, docs: list[Doc]) -> list[Exception | None]:
        """Annotate ``docs``; per doc, None or the exception that doc alone failed with (a failure of
        the whole call raises)."""
        raise NotImplementedError

    def __call__(self, doc: Doc) -> Doc:
        """The doc annotated; on failure the handler decides (a handler that returns leaves it as is)."""
        self._guarded([doc])
        return doc

    def pipe(self, stream: Iterable[Doc], batch_size: int | None = None) -> Iterator[Doc]:
        for batch in _batches(stream, _batch_size(self, batch_size)):
            yield from self._guarded(batch)

    def _guarded(self, batch: list[Doc]) -> list[Doc]:
        try:
            failed = self._annotate(batch)
        except Exception as exc:  # noqa: BLE001 - the handler decides (spaCy's convention)
            if len(batch) == 1:
                self._error_handler(self.name, self, batch, exc)
                return []
            return [d for doc in batch for d in self._guarded([doc])]
        ok = []
        for doc, exc in zip(batch, failed, strict=True):
            if exc is None:
                ok.append(doc)
            else:
                self._error_handler(self.name, self, [doc], exc)
        return ok


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(np.dot(a, b) / (na * nb)) if na and nb else 0.0


class EngineEmbeddings(_Component):
    """Vectors from the engine encoder for Docs (computed per batch) and Spans/Tokens (on first access,
    cached by the manager), with cosine ``similarity``."""

    def __init__(self, nlp: Language, name: str, model: str, batch_size: int, manager: Any = None):
        self.name, self.model, self.batch_size, self.manager = name, model, batch_size, manager

    def embed(self, texts: list[str]) -> np.ndarray:
        return _manager(self).embed(texts, self.model)

    def _annotate(self, docs: list[Doc]) -> list[Exception | None]:
        """One embed call per batch of docs (see ``_batch_size``)."""
        nonempty = [d for d in docs if d.text.strip()]
        vecs = self.embed([d.text for d in nonempty]) if nonempty else []
        for doc, vec in zip(nonempty, vecs, strict=True):
            self._set_hooks(doc, vec)
        return [None] * len(docs)

    def _span_vector(self, span) -> np.ndarray:
        text = span.text
        if not text.strip():
            return np.zeros(self._dim(), dtype=np.float32)
        return self.embed([text])[0]

    def _dim(self) -> int:
        return int(self.embed(["a"]).shape[1])

    def _set_hooks(self, doc: Doc, vec: np.ndarray) -> None:
        def similarity(a, b) -> float:
            return _cos(a.vector, b.vector)

        doc.user_hooks["vector"] = lambda _doc: vec
        doc.user_hooks["has_vector"] = lambda _doc: True
        doc.user_hooks["vector_norm"] = lambda _doc: float(np.linalg.norm(vec))
        doc.user_hooks["similarity"] = similarity
        doc.user_span_hooks["vector"] = self._span_vector
        doc.user_span_hooks["has_vector"] = lambda _span: True
        doc.user_span_hooks["vector_norm"] = lambda span: float(np.linalg.norm(span.vector))
        doc.user_span_hooks["similarity"] = similarity
        doc.user_token_hooks["vector"] = self._span_vector
        doc.user_token_hooks["has_vector"] = lambda _tok: True
        doc.user_token_hooks["vector_norm"] = lambda tok: float(np.linalg.norm(tok.vector))
        doc.user_token_hooks["similarity"] = similarity


class EngineTextCategorizer(_Component):
    """``doc.cats`` over ``labels``: a softmax of cosine to label prototypes (``mode="prototype"``) or the
    LLM's constrained choice (1.0 for the chosen label, ``mode="llm"``)."""

    def __init__(self, nlp: Language, name: str, labels: Sequence[str], mode: str, model: str, llm_model: str,
                 prototypes: dict[str, list[str]] | None, scale: float, batch_size: int, instruction: str,
                 manager: Any = None):
        if mode not in ("prototype", "llm"):
            raise TTAEngineError(f"tta_textcat mode {mode!r} is not supported; use 'prototype' or 'llm'")
        self.name, self.mode, self.model, self.llm_model = name, mode, model, llm_model
        self.batch_size, self.instruction, self.manager = batch_size, instruction, manager
        self._protos = PrototypeClassifier(None, model, labels, prototypes, scale)
        self.labels = self._protos.labels

    def scores(self, texts: list[str]) -> list[dict[str, float]]:
        if self.mode == "prototype":
            self._protos.manager = _manager(self)
            return self._protos.scores(texts)
        chosen = run_sync(choose_labels(_manager(self), self.llm_model, texts, self.labels, self.instruction))
        return [{lab: float(lab == c) for lab in self.labels} for c in chosen]

    def _annotate(self, docs: list[Doc]) -> list[Exception | None]:
        """One embed call (prototype mode) or one set of concurrent LLM requests (llm mode) per batch."""
        nonempty = [d for d in docs if d.text.strip()]
        for doc, cats in zip(nonempty, self.scores([d.text for d in nonempty]) if nonempty else [], strict=True):
            doc.cats.update(cats)
        return [None] * len(docs)


def candidate_spans(doc: Doc, max_tokens: int) -> dict[str, tuple[int, int]]:
    """Token n-grams (up to ``max_tokens``) of the doc that start and end on a word: {text: first (start,
    end) token offsets}. The entity schema only admits these texts, so every span exists in the doc."""
    out: dict[str, tuple[int, int]] = {}
    for i, tok in enumerate(doc):
        if tok.is_punct or tok.is_space:
            continue
        for j in range(i + 1, min(i + max_tokens, len(doc)) + 1):
            last = doc[j - 1]
            if last.is_punct or last.is_space:
                continue
            out.setdefault(doc[i:j].text, (i, j))
    return out


class EngineEntities(_Component):
    """Entities chosen by the LLM under a JSON schema ``{"entities": [{"text", "label"}]}`` where ``text``
    is one of the doc's token n-grams and ``label`` one of ``labels``."""

    def __init__(self, nlp: Language, name: str, labels: Sequence[str], model: str, spans_key: str | None,
                 batch_size: int, max_span_tokens: int, max_tokens: int, instruction: str, manager: Any = None,
                 max_entities: int = 4):
        if not labels:
            raise TTAEngineError("tta_entities needs at least one label in its config")
        self.name, self.labels, self.model, self.spans_key = name, list(labels), model, spans_key
        self.batch_size, self.max_span_tokens, self.max_tokens = batch_size, max_span_tokens, max_tokens
        self.max_entities = max_entities
        self.instruction, self.manager = instruction, manager

    def schema(self, candidates: Sequence[str]) -> dict[str, Any]:
        return {"type": "object", "properties": {"entities": {"type": "array", "maxItems": self.max_entities, "items": {
            "type": "object", "properties": {"text": {"enum": list(candidates)}, "label": {"enum": self.labels}},
            "required": ["text", "label"], "additionalProperties": False}}},
            "required": ["entities"], "additionalProperties": False}

    async def _extract(self, docs: list[Doc]) -> list[list[dict[str, str]]]:
        m = _manager(self)

        async def one(doc: Doc) -> list[dict[str, str]]:
            cands = candidate_spans(doc, self.max_span_tokens)
            if not cands:
                return []
            fmt = {"type": "json_schema", "json_schema": {"name": "entities", "schema": self.schema(list(cands)),
                                                          "strict": True}}
            msgs = [{"role": "system", "content": self.instruction.format(labels=", ".join(self.labels))},
                    {"role": "user", "content": doc.text}]
            c = await m.complete(msgs, self.model, response_format=fmt, temperature=0, max_tokens=self.max_tokens)
            if c["finish_reason"] == "length":
                raise StructuredOutputError(f"tta_entities: the reply hit max_tokens={self.max_tokens} before the "
                                            "JSON was complete; raise max_tokens in the component's config",
                                            raw_text=c["text"])
            return json.loads(c["text"])["entities"]

        return list(await asyncio.gather(*(one(d) for d in docs), return_exceptions=True))

    def spans(self, doc: Doc, found: list[dict[str, str]]) -> list[Span]:
        """Align each found text with the doc (``doc.char_span`` on its first unused occurrence)."""
        cands = candidate_spans(doc, self.max_span_tokens)
        out = []
        for ent in found:
            if ent["text"] not in cands or ent["label"] not in self.labels:
                continue
            i, j = cands[ent["text"]]
            span = doc.char_span(doc[i].idx, doc[j - 1].idx + len(doc[j - 1]), label=ent["label"])
            if span is not None:
                out.append(span)
        return filter_spans(out)

    def _write(self, doc: Doc, spans: list[Span]) -> None:
        if self.spans_key:
            doc.spans[self.spans_key] = spans
            return
        taken = [(e.start, e.end) for e in doc.ents]
        new = [s for s in spans if all(s.end <= a or s.start >= b for a, b in taken)]
        doc.ents = sorted([*doc.ents, *new], key=lambda s: s.start)

    def _annotate(self, docs: list[Doc]) -> list[Exception | None]:
        """The docs of a batch go to the engine as concurrent requests (decoded in shared steps); a doc
        whose request failed fails alone."""
        failed: list[Exception | None] = []
        for doc, found in zip(docs, run_sync(self._extract(docs)), strict=True):
            if isinstance(found, BaseException):
                if not isinstance(found, Exception):
                    raise found  # cancellation and the like are not a doc's failure
                failed.append(found)
                continue
            self._write(doc, self.spans(doc, found))
            failed.append(None)
        return failed


@Language.factory("tta_embeddings", default_config={"model": DEFAULT_EMBEDDING_MODEL, "batch_size": 256})
def make_embeddings(nlp: Language, name: str, model: str, batch_size: int) -> EngineEmbeddings:
    return EngineEmbeddings(nlp, name, model, batch_size)


@Language.factory("tta_textcat", assigns=["doc.cats"], default_config={
    "labels": [], "mode": "prototype", "model": DEFAULT_EMBEDDING_MODEL, "llm_model": DEFAULT_CHAT_MODEL,
    "prototypes": None, "scale": 20.0, "batch_size": 256, "instruction": DEFAULT_CHOICE_INSTRUCTION})
def make_textcat(nlp: Language, name: str, labels: list[str], mode: str, model: str, llm_model: str,
                 prototypes: dict[str, list[str]] | None, scale: float, batch_size: int,
                 instruction: str) -> EngineTextCategorizer:
    return EngineTextCategorizer(nlp, name, labels, mode, model, llm_model, prototypes, scale, batch_size,
                                 instruction)


@Language.factory("tta_entities", assigns=["doc.ents"], default_config={
    "labels": ["PERSON", "PLACE", "OBJECT", "EVENT", "EMOTION"], "model": DEFAULT_CHAT_MODEL,
    "spans_key": None, "batch_size": 16, "max_span_tokens": 4, "max_entities": 4, "max_tokens": 160,
    "instruction": "List the named entities in the user's text as JSON, with labels from: {labels}."})
def make_entities(nlp: Language, name: str, labels: list[str], model: str, spans_key: str | None,
                  batch_size: int, max_span_tokens: int, max_entities: int, max_tokens: int,
                  instruction: str) -> EngineEntities:
    return EngineEntities(nlp, name, labels, model, spans_key, batch_size, max_span_tokens, max_tokens,
                          instruction, max_entities=max_entities)
