"""spaCy components on tiny artifacts: factories found through entry points, vectors and similarity
from the engine encoder, prototype textcat, batching of nlp.pipe."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

spacy = pytest.importorskip("spacy")

from tta_engine.errors import TTAEngineError  # noqa: E402
from tta_engine.integrations.common import default_manager, set_default_manager  # noqa: E402
from tta_engine.manager import TransformersModelManager  # noqa: E402

EMB = "tiny-bert"


class CountingManager(TransformersModelManager):
    """Counts embed calls (one per nlp.pipe batch is the contract)."""

    embed_calls = 0

    def embed(self, texts, model_name=EMB):
        self.embed_calls += 1
        return super().embed(texts, model_name)


@pytest.fixture(scope="module")
def manager(artifacts, tiny_configs, tmp_path_factory):
    artifacts.get(EMB, "fp32")
    m = CountingManager(tiny_configs, cache_dir=str(tmp_path_factory.mktemp("sp-cache")),
                        artifacts_root=artifacts.root / "auto")
    previous = default_manager.__globals__["_manager"]
    set_default_manager(m)
    yield m
    set_default_manager(previous)
    m.close()


def test_factories_are_registered_through_entry_points():
    import subprocess
    import sys

    # a fresh interpreter that never imports tta_engine itself: spaCy must find the factories
    code = ("import sys, spacy; nlp = spacy.blank('en'); assert 'tta_engine.integrations.spacy' in sys.modules; "
            "[nlp.add_pipe(n) for n in ('tta_embeddings', 'tta_textcat', 'tta_entities')]; print(nlp.pipe_names)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "['tta_embeddings', 'tta_textcat', 'tta_entities']" in out.stdout


def test_vectors_and_similarity_come_from_the_engine(manager):
    nlp = spacy.blank("en")
    nlp.add_pipe("tta_embeddings", config={"model": EMB})
    doc = nlp("The calm lake at night.")
    other = nlp("A storm over the sea.")
    np.testing.assert_allclose(doc.vector, manager.embed([doc.text], EMB)[0], rtol=1e-6)
    assert doc.has_vector and doc.vector.shape == (64,)
    span = doc[1:3]
    np.testing.assert_allclose(span.vector, manager.embed(["calm lake"], EMB)[0], rtol=1e-6)
    np.testing.assert_allclose(doc[2].vector, manager.embed(["lake"], EMB)[0], rtol=1e-6)
    a, b = manager.embed([doc.text, other.text], EMB)
    assert doc.similarity(other) == pytest.approx(float(a @ b) / float(np.linalg.norm(a) * np.linalg.norm(b)),
                                                  abs=1e-5)
    assert doc.similarity(doc) == pytest.approx(1.0, abs=1e-5)
    assert span.similarity(doc[2]) == pytest.approx(
        float(np.dot(span.vector, doc[2].vector) / (np.linalg.norm(span.vector) * np.linalg.norm(doc[2].vector))),
        abs=1e-5)


def test_pipe_embeds_each_batch_in_one_call(manager):
    nlp = spacy.blank("en")
    nlp.add_pipe("tta_embeddings", config={"model": EMB, "batch_size": 32})
    texts = [f"Sentence number {i} about the forest." for i in range(64)]
    before = manager.embed_calls
    docs = list(nlp.pipe(texts))
    assert manager.embed_calls - before == 2  # 64 docs, batch size 32
    ref = manager.embed(texts, EMB)
    np.testing.assert_allclose(np.stack([d.vector for d in docs]), ref, rtol=1e-6)


def test_prototype_textcat_scores_follow_the_nearest_prototype(manager):
    nlp = spacy.blank("en")
    protos = {"forest": ["The lantern flickers in the quiet forest."],
              "river": ["The river sings over smooth stones under the moon."]}
    nlp.add_pipe("tta_textcat", config={"model": EMB, "labels": ["forest", "river"], "prototypes": protos})
    docs = list(nlp.pipe(["The lantern flickers in the quiet forest.",
                          "The river sings over smooth stones under the moon."]))
    assert docs[0].cats["forest"] > docs[0].cats["river"] and docs[1].cats["river"] > docs[1].cats["forest"]
    assert sum(docs[0].cats.values()) == pytest.approx(1.0)
    # the scores are a softmax of cosine to the prototype centroids
    v = manager.embed([docs[0].text], EMB)[0]
    c = manager.embed(protos["forest"] + protos["river"], EMB)
    sims = c @ v
    p = np.exp(20 * (sims - sims.max()))
    assert docs[0].cats["forest"] == pytest.approx(p[0] / p.sum(), rel=1e-4)


def test_bad_config_raises_typed_errors(manager):
    nlp = spacy.blank("en")
    with pytest.raises(TTAEngineError, match="mode"):
        nlp.add_pipe("tta_textcat", config={"mode": "guess"})
    with pytest.raises(TTAEngineError, match="at least one label"):
        nlp.add_pipe("tta_entities", config={"labels": []})


def test_empty_docs_pass_through(manager):
    nlp = spacy.blank("en")
    nlp.add_pipe("tta_embeddings", config={"model": EMB})
    nlp.add_pipe("tta_textcat", config={"model": EMB, "labels": ["a", "b"]})
    doc = nlp("")
    assert doc.cats == {} and len(doc) == 0


# -- LLM components (constrained decoding; a random model still gives valid output) -------------------
LM = "tiny-llama"
needs_structured = pytest.mark.skipif(importlib.util.find_spec("tta_engine.structured") is None,
                                      reason="tta_engine.structured (constrained decoding) is not installed")


@pytest.fixture(scope="module")
def lm_manager(manager, artifacts):
    artifacts.get(LM, "fp32")
    return manager


@needs_structured
def test_entities_are_char_aligned_spans_of_the_text_and_keep_existing_ents(lm_manager):
    from spacy.tokens import Span

    nlp = spacy.blank("en")
    nlp.add_pipe("tta_entities", config={"model": LM, "labels": ["PLACE", "THING"], "max_tokens": 140,
                                         "max_entities": 2})
    text = "The lantern flickers in the quiet forest by the river."
    doc = nlp.make_doc(text)
    doc.ents = [Span(doc, 1, 2, label="OBJ")]  # "lantern", set by an earlier component
    doc = nlp.get_pipe("tta_entities")(doc)
    assert any(e.label_ == "OBJ" and e.text == "lantern" for e in doc.ents)
    for e in doc.ents:
        assert text[e.start_char:e.end_char] == e.text
        assert e.label_ in ("OBJ", "PLACE", "THING")
    found = nlp.get_pipe("tta_entities").spans(doc, [{"text": "quiet forest", "label": "PLACE"},
                                                     {"text": "not in the text", "label": "PLACE"}])
    assert [(s.text, s.label_, s.start_char) for s in found] == [("quiet forest", "PLACE", text.index("quiet"))]
    keyed = spacy.blank("en")
    keyed.add_pipe("tta_entities", config={"model": LM, "labels": ["PLACE"], "spans_key": "sc", "max_tokens": 140,
                                           "max_entities": 2})
    d2 = keyed(text)
    assert d2.ents == () and all(text[s.start_char:s.end_char] == s.text for s in d2.spans["sc"])


@needs_structured
def test_llm_textcat_batches_concurrent_requests(lm_manager):
    nlp = spacy.blank("en")
    nlp.add_pipe("tta_textcat", config={"mode": "llm", "llm_model": LM, "labels": ["forest", "river"],
                                        "batch_size": 64})
    texts = [f"Sentence {i} about the lantern." for i in range(64)]
    stats = lm_manager.stats
    b = stats().get(LM, {})
    steps0, tokens0 = b.get("scheduler_steps", 0), b.get("completion_tokens", 0)
    docs = list(nlp.pipe(texts))
    s = stats()[LM]
    for d in docs:
        assert sorted(d.cats.values()) == [0.0, 1.0] and set(d.cats) == {"forest", "river"}
    # 64 requests of >= 1 token each: one at a time they need at least their token count in steps; here
    # rows share steps, so far fewer steps than tokens were decoded
    assert s["scheduler_steps"] - steps0 < (s["completion_tokens"] - tokens0) / 4, s


def _failing_on(manager, monkeypatch, method: str, marker: str):
    real = getattr(manager, method)

    def fake(texts_or_msgs, *a, **k):
        text = texts_or_msgs if isinstance(texts_or_msgs, list) and isinstance(texts_or_msgs[0], str) else \
            [m["content"] for m in texts_or_msgs]
        if any(marker in t for t in text):
            raise ValueError(f"cannot process {marker}")
        return real(texts_or_msgs, *a, **k)

    monkeypatch.setattr(manager, method, fake)


@pytest.mark.parametrize("component", ["tta_embeddings", "tta_textcat", "tta_entities"])
def test_error_handler_gets_only_the_failing_doc_and_the_batch_goes_on(manager, monkeypatch, component):
    config = {"tta_embeddings": {"model": EMB}, "tta_textcat": {"model": EMB, "labels": ["calm", "storm"]},
              "tta_entities": {"model": LM, "labels": ["PLACE"], "max_tokens": 140, "max_entities": 1}}[component]
    _failing_on(manager, monkeypatch, "complete" if component == "tta_entities" else "embed", "BROKEN")
    texts = ["A calm lake.", "The BROKEN bridge.", "A storm at sea."]
    nlp = spacy.blank("en")
    nlp.add_pipe(component, config=config)
    with pytest.raises(ValueError, match="BROKEN"):  # spaCy's default handler raises
        list(nlp.pipe(texts))
    seen = []
    nlp.set_error_handler(lambda name, proc, docs, exc: seen.append((name, [d.text for d in docs], str(exc))))
    out = list(nlp.pipe(texts))
    assert [d.text for d in out] == ["A calm lake.", "A storm at sea."]
    assert seen == [(component, ["The BROKEN bridge."], "cannot process BROKEN")]
    if component == "tta_embeddings":
        np.testing.assert_allclose(out[1].vector, manager.embed(["A storm at sea."], EMB)[0], rtol=1e-6)
    elif component == "tta_textcat":
        assert set(out[0].cats) == {"calm", "storm"}
