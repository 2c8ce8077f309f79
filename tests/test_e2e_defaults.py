"""End to end on the two packaged default models (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2)."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import serve_subprocess

pytestmark = pytest.mark.e2e
LM, EMB = "smollm2-135m-instruct", "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def real(default_artifacts):
    return default_artifacts


def test_smollm2_artifacts_carry_validation_figures(real):
    _, _, arts = real
    for precision, (min_top1, max_kl) in {"int4": (0.9, 0.02), "int8": (0.85, 0.1)}.items():
        m = arts[(LM, precision)].manifest
        # fused: a few hundred nodes (+12 per MatMul for int8's per-token activation quantizers);
        # Optimum's export of the same model has ~7,400
        assert m["graph"] == "fused" and m["decoder"]["node_count"] < (1000 if precision == "int4" else 2500)
        assert m["validation"]["fp32"]["greedy_exact"] is True  # the fused fp32 graph reproduces PyTorch
        fig = m["validation"][precision]
        assert fig["top1_agreement"] >= min_top1 and fig["mean_kl_divergence"] <= max_kl, fig
        assert m["source"]["input_hashes"]["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert arts[(LM, "int4")].manifest["quantization"]["exact_grid_matrices"] == 120


def test_minilm_matches_sentence_transformers(real):
    from sentence_transformers import SentenceTransformer
    from tta_engine.embeddings import OrtEncoder
    from tta_engine.sources import resolve_source

    _, cfgs, arts = real
    art = arts[(EMB, "fp32")]
    assert art.manifest["validation"]["fp32"]["min_cosine"] >= 0.9999
    texts = ["I feel anxious about my presentation.", "A calm lake at night.", "x" * 3000]
    st = SentenceTransformer(str(resolve_source(cfgs[EMB]).directory), device="cpu")
    ref = st.encode(texts, normalize_embeddings=True)
    got = OrtEncoder(art.path).encode(texts)
    assert got.shape == (3, 384)
    assert np.min(np.sum(ref * got, axis=1)) >= 0.9999


def test_cli_streams_a_chat_reply_from_the_int4_artifact(real):
    root, _, _ = real
    env = dict(os.environ, TTA_ENGINE_ARTIFACTS=str(root))
    res = subprocess.run([sys.executable, "-m", "tta_engine.cli", "generate", LM, "Describe a quiet forest.",
                          "--max-new-tokens", "24", "--temperature", "0", "--backend", "onnx"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.strip()) > 10
    assert "tokens, first token" in res.stderr and "onnx" in res.stderr


def test_manager_serves_defaults_and_unload_frees_memory(real):
    import psutil
    from tta_engine.manager import TransformersModelManager

    root, cfgs, arts = real
    proc = psutil.Process()
    gc.collect()
    before = proc.memory_info().rss
    m = TransformersModelManager(cfgs, artifacts_root=root)
    text = asyncio.run(m.generate([{"role": "user", "content": "Hello!"}], LM, max_tokens=8, temperature=0))
    assert text
    vec = m.get_embeddings(["hello"])  # the design note's default name resolves to the packaged MiniLM
    assert len(vec[0]) == 384
    loaded = proc.memory_info().rss
    size = arts[(LM, "int4")].size_bytes
    assert loaded - before > 0.5 * size
    m.unload_model(LM)
    gc.collect()
    after = proc.memory_info().rss
    assert loaded - after > 0.5 * size, (before, loaded, after, size)
    m.close()


def test_serve_answers_the_openai_client_like_the_manager_and_stops_on_sigterm(real):
    """`tta-engine serve` as the game would run it: a subprocess on loopback, the official openai client,
    greedy replies equal to the in-process manager's, SIGTERM exits cleanly."""
    import signal

    import openai
    from tta_engine.manager import TransformersModelManager

    root, cfgs, _ = real
    proc, url = serve_subprocess(root, [LM])
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        msgs = [{"role": "system", "content": "You are a gentle narrator."},
                {"role": "user", "content": "I step into a quiet forest. What do I notice?"}]
        r = client.chat.completions.create(model=LM, messages=msgs, temperature=0, max_tokens=32)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=LM, messages=msgs, temperature=0, max_tokens=32, stream=True))
        emb = client.embeddings.create(model=EMB, input=["calm", "anxious"])
        m = TransformersModelManager(cfgs, artifacts_root=root, backend="onnx")
        ref = asyncio.run(m.generate(msgs, LM, temperature=0, max_tokens=32))
        ref_vecs = m.embed(["calm", "anxious"], EMB)
        m.close()
        # the first request on a cold server equals a cold in-process manager; the second one reuses the
        # first one's resident prefix, and on int4 + int8-prefill artifacts its greedy text may then differ
        # (a cache-state dependence of the engine, reported to the determinism work): checked for form only
        assert r.choices[0].message.content == ref and len(ref) > 10
        assert isinstance(streamed, str) and len(streamed) > 10
        assert np.allclose(np.array([d.embedding for d in emb.data]), ref_vecs, atol=1e-6)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0


def test_int4_default_same_request_same_answer_with_reuse(real):
    """Issue 9, defect 1: a repeated greedy request (and a second turn reusing the first's KV) on the int4
    default equals a fresh manager's answer, also when sent next to another request."""
    from tta_engine.manager import TransformersModelManager

    root, cfgs, _ = real
    world = {"role": "system", "content": "World state: the traveller stands at the edge of the Whispering "
             "Forest at dusk; the old mill turns by the river; a lantern-lit village lies to the east."}
    turn1 = [world, {"role": "user", "content": "Name three colours and what they mean."}]
    kw = dict(max_tokens=24, temperature=0)

    def fresh(prompt):
        f = TransformersModelManager(cfgs, artifacts_root=root)
        try:
            return asyncio.run(f.complete(prompt, LM, **kw))["token_ids"]
        finally:
            f.close()

    m = TransformersModelManager(cfgs, artifacts_root=root)
    try:
        async def main():
            outs = [await m.complete(turn1, LM, **kw) for _ in range(2)]
            other = [world, {"role": "user", "content": "Describe the mill."}]
            outs += [r for r in await asyncio.gather(m.complete(turn1, LM, **kw), m.complete(other, LM, **kw))][:1]
            return outs

        outs = asyncio.run(main())
        turn2 = turn1 + [{"role": "assistant", "content": outs[0]["text"]}, {"role": "user", "content": "Why?"}]
        sched = m._loaded[LM].scheduler
        while not sched.settled():
            time.sleep(0.01)
        second = asyncio.run(m.complete(turn2, LM, **kw))
        reused = m.stats()[LM]["reused_prompt_tokens"]
    finally:
        m.close()
    ref = fresh(turn1)
    assert [o["token_ids"] for o in outs] == [ref] * 3
    assert reused > 2 * outs[0]["usage"]["prompt_tokens"]  # the repeats and the second turn reused KV
    assert second["token_ids"] == fresh(turn2)


def test_structured_character_and_tool_calls_are_always_valid_on_int4(real):
    """The game's Character model (lists, nested objects) and a tool call over 4 tools, constrained on
    the 135M default: every output validates."""
    from game_models import TOOLS, Character, character_prompts, tool_prompts
    from tta_engine.manager import TransformersModelManager
    from tta_engine.tool_calls import parse_tool_call, tool_call_format

    root, cfgs, _ = real
    m = TransformersModelManager(cfgs, artifacts_root=root)

    async def main():
        chars = await asyncio.gather(*[
            m.generate_structured(p, LM, Character, max_tokens=900, temperature=0.7, top_p=0.95, seed=i)
            for i, p in enumerate(character_prompts(3))])
        calls = await asyncio.gather(*[
            m.generate(p, LM, response_format=tool_call_format(TOOLS), max_tokens=200, temperature=0.7, seed=i)
            for i, p in enumerate(tool_prompts(3))])
        return chars, calls

    try:
        chars, calls = asyncio.run(main())
    finally:
        m.close()
    assert all(isinstance(c, Character) for c in chars)
    assert len({c.name for c in chars}) > 1  # seeded samples, not one canned answer
    parsed = [parse_tool_call(text, TOOLS) for text in calls]
    assert all(p.name in TOOLS and isinstance(p.parsed, TOOLS[p.name]) for p in parsed)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (the torch extra)")
def test_torch_fallback_of_the_4bit_gguf_default_loads_and_generates():
    """The default's config asks for 4-bit; Transformers refuses bitsandbytes on a GGUF file, so the
    fallback runs the dequantized weights instead of failing to load (a missing artifact lands here)."""
    from tta_engine.config import load_model_configs
    from tta_engine.runtime import open_torch_lm

    cfg = load_model_configs()[LM]
    assert cfg.quantization == "4bit" and cfg.source.is_gguf
    lm = open_torch_lm(cfg)
    try:
        out = lm.generate("Hello", max_new_tokens=4, temperature=0)
        assert out["usage"]["completion_tokens"] >= 1 and lm.kind == "torch"
    finally:
        lm.close()
