"""End to end on the real Gemma 3 270M (base model, Q4_K_M GGUF from the five PyPI wheels): the int4 export's
figures and size, generation and streaming through the manager, the server with the openai client, and
logits past the 512-token sliding window and past 2,048 tokens against PyTorch on the same GGUF."""

from __future__ import annotations

import asyncio
import signal

import numpy as np
import pytest
from helpers import serve_subprocess

pytestmark = pytest.mark.e2e
LM = "gemma-3-270m"
PROMPT = "The lighthouse keeper climbed the stairs and"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from tta_engine.config import load_model_configs
    from tta_engine.export.pipeline import ExportOptions, export_model
    from tta_engine.sources import resolve_source

    cfgs = load_model_configs()
    try:
        src = resolve_source(cfgs[LM])
    except Exception as exc:  # noqa: BLE001 - the wheels are installed by make setup; a reason, not a failure
        pytest.skip(f"Gemma 3 270M GGUF not installed: {exc}")
    root = tmp_path_factory.mktemp("gemma-artifacts")
    art = export_model(cfgs[LM], ExportOptions(precision="int4", out_root=root))
    return root, cfgs, art, src


def test_int4_export_figures_and_size(gemma):
    _, _, art, src = gemma
    m = art.manifest
    fig = m["validation"]["int4"]
    # the int4 targets (export/gate.py TARGETS); the figures are measured on this CPU's kernels. One int8
    # digit misses them on Gemma's activations (top-1 0.916 on AVX-512 VNNI), two digits meet them
    assert fig["top1_agreement"] >= 0.93 and fig["mean_kl_divergence"] <= 0.02, fig
    acts = m["quantization"]["activations"]
    assert acts["mode"] == "int16" and acts["matrices"] == 46, acts
    assert acts["int8_figures"]["mean_kl_divergence"] > fig["mean_kl_divergence"], acts
    assert m["validation"]["fp32"]["greedy_exact"] is True
    q = m["quantization"]
    assert q["rtn_matrices"] == 0 and q["exact_grid_matrices"] == 72 and q["tied_embedding_shared"] is True
    gguf_bytes = (src.directory / src.gguf_file).stat().st_size
    assert art.size_bytes <= 1.5 * gguf_bytes, (art.size_bytes, gguf_bytes)


def test_manager_generates_and_streams_the_same_text(gemma):
    from tta_engine.manager import TransformersModelManager

    root, cfgs, _, _ = gemma
    m = TransformersModelManager(cfgs, artifacts_root=root, backend="onnx")
    try:
        full = asyncio.run(m.generate(PROMPT, LM, temperature=0, max_tokens=24))
        chunks: list[str] = []
        streamed = asyncio.run(m.generate_streaming(PROMPT, LM, chunks.append, temperature=0, max_tokens=24))
        assert full == streamed == "".join(chunks) and len(chunks) > 1 and len(full.split()) >= 5
    finally:
        m.close()


def test_serve_completions_equal_the_manager_and_stop_on_sigterm(gemma):
    import openai
    from tta_engine.manager import TransformersModelManager

    root, cfgs, _, _ = gemma
    proc, url = serve_subprocess(root, [LM])
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model=LM, prompt=PROMPT, temperature=0, max_tokens=16)
        m = TransformersModelManager(cfgs, artifacts_root=root, backend="onnx")
        ref = asyncio.run(m.generate(PROMPT, LM, temperature=0, max_tokens=16))
        m.close()
        assert r.choices[0].text == ref and len(ref) > 5
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=LM, prompt=PROMPT, temperature=0, max_tokens=16, stream=True))
        assert streamed == ref
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0


def test_logits_past_the_sliding_window_and_past_2048_match_pytorch(gemma):
    """Local layers see 512 tokens: at positions 519, 1029, 2049, 2099 (prompt chunks through the KV cache)
    and 2100-2103 (decode steps) the int4 artifact's next-token distribution stays as close to PyTorch
    fp32 as at the start; a local layer that saw the whole context (or lost its window) is far off."""
    import torch
    from tta_engine.artifact import load_artifact
    from tta_engine.export.validate import top1_and_kl
    from tta_engine.runtime import open_artifact_lm
    from tta_engine.sources import gguf_parsed_once, load_torch_causal_lm

    root, cfgs, art, src = gemma
    rng = np.random.default_rng(0)
    lm = open_artifact_lm(load_artifact(art.path))
    words = ("lantern river meadow quiet stone path bird rain window garden morning hill village bridge "
             "cloud candle forest harbour").split()
    text = " ".join(rng.choice(words, 3000))
    ids = lm.tokenizer.encode(text)[:2104]
    assert len(ids) == 2104
    bounds = [520, 1030, 2050, 2100]
    dec = lm.backend
    cache = dec.new_cache(1, capacity=2112)
    got, start = [], 0
    for b in bounds:
        got.append(dec.forward(cache, np.array([ids[start:b]]))[0])
        start = b
    for t in ids[2100:2103]:
        got.append(dec.forward(cache, np.array([[t]]))[0])
    positions = [b - 1 for b in bounds] + [2100, 2101, 2102]
    with gguf_parsed_once():
        model = load_torch_causal_lm(cfgs[LM], src)
    with torch.no_grad():
        ref = model(torch.tensor([ids[:2103]]), logits_to_keep=torch.tensor(positions)).logits[0].float().numpy()
    top1, kl = top1_and_kl(ref.astype(np.float64), np.stack(got).astype(np.float64))
    assert max(kl) <= 0.1 and float(np.mean(kl)) <= 0.03, dict(zip(positions, kl, strict=True))
    assert sum(top1) >= len(positions) - 2, dict(zip(positions, top1, strict=True))
