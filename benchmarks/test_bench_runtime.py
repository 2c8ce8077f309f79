"""pytest-benchmark suites of the runtime on the packaged default models (not part of the default test run).

    .venv/bin/pytest benchmarks/ --benchmark-only
    .venv/bin/pytest benchmarks/ --benchmark-only --benchmark-group-by=group,param -k "decode or prefill"

Each causal-LM benchmark runs for the int4, int8 and fp32 artifacts; each is skipped when its artifact is
missing (with the export command), so the suite is quick and green on a machine without artifacts.
The artifacts root is $TTA_ENGINE_ARTIFACTS, else <repo>/artifacts. Rounds are few on purpose: a full
run takes a couple of minutes on two cores.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
from bench import SINGLE_QUERY, bench_messages, embedding_corpus

LM = "smollm2-135m-instruct"
EMBEDDER = "all-minilm-l6-v2"


def artifacts_root() -> Path:
    return Path(os.environ.get("TTA_ENGINE_ARTIFACTS") or Path(__file__).resolve().parents[1] / "artifacts")


def artifact_path(name: str, precision: str) -> Path:
    path = artifacts_root() / name / precision
    if not (path / "manifest.json").is_file():
        pytest.skip(f"no artifact at {path}: run `tta-engine export {name} --precision {precision}`")
    return path


@pytest.fixture(scope="session")
def configs():
    from tta_engine.config import load_model_configs

    return load_model_configs()


@pytest.fixture(scope="module", params=["int4", "int8", "fp32"])
def lm(request, configs):
    from tta_engine.artifact import load_artifact
    from tta_engine.runtime import open_artifact_lm

    model = open_artifact_lm(load_artifact(artifact_path(LM, request.param)), configs[LM])
    model.precision = request.param
    yield model
    model.close()


@pytest.fixture(scope="module", params=["fp32", "int8"])
def encoder(request):
    from tta_engine.embeddings import OrtEncoder

    enc = OrtEncoder(artifact_path(EMBEDDER, request.param))
    yield enc
    enc.close()


@pytest.fixture(scope="module")
def prompt_ids(lm):
    from bench import chat_prompt_ids

    return chat_prompt_ids(lm.tokenizer, 270)


# -- causal LM --------------------------------------------------------------------------------------------

@pytest.mark.benchmark(group="prefill (270-token chat prompt)")
def test_prefill(benchmark, lm, prompt_ids):
    backend = lm.backend
    ids = np.asarray([prompt_ids], dtype=np.int64)

    def prefill():
        cache = backend.new_cache(1, capacity=len(prompt_ids) + 1)
        backend.forward(cache, ids)
        cache.close()

    benchmark.pedantic(prefill, rounds=5, warmup_rounds=1)
    benchmark.extra_info["prompt_tokens"] = len(prompt_ids)
    benchmark.extra_info["prefill_tok_s"] = len(prompt_ids) / benchmark.stats.stats.median


@pytest.mark.benchmark(group="decode one token (after the 270-token prompt)")
def test_decode_per_token(benchmark, lm, prompt_ids):
    backend = lm.backend
    cache = backend.new_cache(1, capacity=len(prompt_ids) + 8)
    logits = backend.forward(cache, np.asarray([prompt_ids], dtype=np.int64))
    if not hasattr(cache, "rewind"):
        pytest.skip("this cache layout cannot rewind")
    length = len(prompt_ids)
    token = np.array([[int(logits[0].argmax())]], dtype=np.int64)

    def step():
        backend.forward(cache, token)
        cache.rewind(length)  # back to the same position, so every round decodes at the same context

    benchmark.pedantic(step, rounds=60, warmup_rounds=5)
    benchmark.extra_info["tok_s"] = 1.0 / benchmark.stats.stats.median
    cache.close()


@pytest.mark.benchmark(group="generate 32 tokens end to end")
def test_generate_end_to_end(benchmark, lm):
    msgs = bench_messages()
    out = benchmark.pedantic(lambda: lm.generate(msgs, temperature=0.0, max_new_tokens=32, min_new_tokens=32),
                             rounds=3, warmup_rounds=1)
    assert out["usage"]["completion_tokens"] == 32
    benchmark.extra_info["decode_tok_s"] = out["timings"]["decode_tokens_per_s"]


@pytest.mark.benchmark(group="stream: first token")
def test_stream_first_token(benchmark, lm):
    msgs = bench_messages()

    def first():
        it = lm.stream(msgs, temperature=0.0, max_new_tokens=8)
        delta = next(it)
        it.close()
        return delta

    benchmark.pedantic(first, rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="cold start: open an artifact")
@pytest.mark.parametrize("precision", ["int4", "int8", "fp32"])
def test_load_language_model(benchmark, configs, precision):
    from tta_engine.artifact import load_artifact
    from tta_engine.runtime import open_artifact_lm

    path = artifact_path(LM, precision)

    def load():
        open_artifact_lm(load_artifact(path), configs[LM]).close()  # sha256 verification included

    benchmark.pedantic(load, rounds=2, warmup_rounds=0)


# -- embeddings -------------------------------------------------------------------------------------------

@pytest.mark.benchmark(group="embeddings: 64 sentences, batch 32")
def test_embed_batch(benchmark, encoder):
    corpus = embedding_corpus(64)
    vecs = benchmark.pedantic(lambda: encoder.encode(corpus, batch_size=32), rounds=5, warmup_rounds=1)
    assert vecs.shape[0] == 64
    benchmark.extra_info["sentences_s"] = 64 / benchmark.stats.stats.median


@pytest.mark.benchmark(group="embeddings: single query")
def test_embed_single_query(benchmark, encoder):
    benchmark.pedantic(lambda: encoder.encode([SINGLE_QUERY]), rounds=50, warmup_rounds=5)


@pytest.mark.benchmark(group="cold start: open an artifact")
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_load_encoder(benchmark, precision):
    from tta_engine.embeddings import OrtEncoder

    path = artifact_path(EMBEDDER, precision)
    benchmark.pedantic(lambda: OrtEncoder(path).close(), rounds=3, warmup_rounds=0)


# -- the model manager (issue 4) ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manager(configs):
    mod = pytest.importorskip("tta_engine.manager", reason="tta_engine.manager does not exist yet (issue 4)")
    cfg = configs[LM]
    artifact_path(LM, cfg.precision)
    try:  # prefix cache off: the same prompt repeats, and its reuse would hide the overhead being measured
        mgr = mod.TransformersModelManager({LM: cfg}, artifacts_root=artifacts_root(), prefix_cache_entries=0)
    except TypeError:
        mgr = mod.TransformersModelManager({LM: cfg}, artifacts_root=artifacts_root())
    mgr.load_model(LM)
    yield mgr
    mgr.close()


@pytest.mark.benchmark(group="manager overhead: 16-token request")
def test_manager_request(benchmark, manager):
    msgs = bench_messages()

    def request():
        return asyncio.run(manager.complete(msgs, LM, temperature=0.0, max_tokens=16, min_new_tokens=16))

    out = benchmark.pedantic(request, rounds=3, warmup_rounds=1)
    assert out["usage"]["completion_tokens"] == 16


@pytest.mark.benchmark(group="manager overhead: 16-token request")
def test_direct_request_for_comparison(benchmark, configs):
    from tta_engine.artifact import load_artifact
    from tta_engine.runtime import open_artifact_lm

    cfg = configs[LM]
    model = open_artifact_lm(load_artifact(artifact_path(LM, cfg.precision)), cfg)
    msgs = bench_messages()
    try:
        out = benchmark.pedantic(lambda: model.generate(msgs, temperature=0.0, max_new_tokens=16, min_new_tokens=16),
                                 rounds=3, warmup_rounds=1)
    finally:
        model.close()
    assert out["usage"]["completion_tokens"] == 16
