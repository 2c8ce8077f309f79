"""GPU paths, checked against the CPU fp32 artifact on tiny models. Marked ``gpu``: skipped where no CUDA
device is usable (CPU CI); ``benchmarks/gpu_check.py`` runs them (``pytest -m gpu``) on a GPU machine."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from helpers import two_turns
from tta_engine.device import resolve_device
from tta_engine.errors import BackendUnavailableError


def _usable(backend: str) -> bool:
    try:
        return resolve_device("cuda", backend).is_cuda
    except BackendUnavailableError:
        return False


ORT_CUDA, TORCH_CUDA = _usable("onnx"), _usable("torch")
pytestmark = pytest.mark.gpu
needs_ort = pytest.mark.skipif(not ORT_CUDA, reason="onnxruntime-gpu with a CUDA device is not available")
needs_torch = pytest.mark.skipif(not TORCH_CUDA, reason="PyTorch with a CUDA device is not available")
MSGS = [{"role": "user", "content": "The lantern flickers in the quiet forest."}]


def _greedy(dec, prompt: np.ndarray, steps: int = 32) -> tuple[list[int], np.ndarray]:
    cache = dec.new_cache(1, 8)  # grows on the device while decoding
    logits = dec.forward(cache, prompt[None, :])[0]
    tokens, rows = [], [logits]
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        logits = dec.forward(cache, np.array([[tokens[-1]]]))[0]
        rows.append(logits)
    cache.close()
    return tokens, np.stack(rows)


@needs_ort
def test_auto_takes_the_gpu_for_onnx():
    dev = resolve_device("auto", "onnx")
    assert dev.is_cuda and dev.provider == "CUDAExecutionProvider"


@needs_torch
def test_auto_takes_the_gpu_for_torch():
    assert resolve_device("auto", "torch").is_cuda


@needs_ort
@pytest.mark.parametrize("arch,graph", [("llama", "auto"), ("qwen2", "auto"), ("gemma3", "auto"),
                                        ("phi3", "auto"), ("llama", "optimum")])
def test_ort_cuda_fp32_equals_cpu_fp32_for_32_greedy_tokens(artifacts, arch, graph):
    from tta_engine.ort_decoder import OrtDecoder

    if graph == "optimum":
        pytest.importorskip("optimum.exporters.onnx", reason="the unfused graph is exported with Optimum")
    art = artifacts.get(f"tiny-{arch}", "fp32", graph)
    meta = art.manifest["decoder"]
    cpu = OrtDecoder(art.file("model.onnx"), meta, device="cpu")
    gpu = OrtDecoder(art.file("model.onnx"), meta, device="cuda")
    assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    cache = gpu.new_cache(1, 4)
    assert getattr(cache.keys[0], "is_cuda", False) if meta["graph"] == "fused" else True
    prompt = np.random.default_rng(5).integers(3, meta["vocab_size"], size=17)
    want, want_rows = _greedy(cpu, prompt)
    got, got_rows = _greedy(gpu, prompt)
    assert got == want
    np.testing.assert_allclose(got_rows, want_rows, atol=1e-3, rtol=1e-3)


@needs_ort
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_ort_cuda_fp16_top1_agrees_with_cpu_fp32(artifacts, arch):
    from tta_engine.ort_decoder import OrtDecoder

    fp16, fp32 = artifacts.get(f"tiny-{arch}", "fp16"), artifacts.get(f"tiny-{arch}", "fp32")
    gpu = OrtDecoder(fp16.file("model.onnx"), fp16.manifest["decoder"], device="cuda")
    cpu = OrtDecoder(fp32.file("model.onnx"), fp32.manifest["decoder"], device="cpu")
    ids = np.random.default_rng(6).integers(3, fp32.manifest["decoder"]["vocab_size"], size=48)
    rows = []
    for dec in (gpu, cpu):
        cache = dec.new_cache(1, 8)
        rows.append(np.stack([dec.forward(cache, ids[None, i : i + 1])[0] for i in range(len(ids))]))
    top1 = float(np.mean(rows[0].argmax(-1) == rows[1].argmax(-1)))
    assert top1 >= 0.97, top1


@needs_ort
def test_ort_cuda_graph_needs_an_fp16_artifact(artifacts):
    from tta_engine.errors import ConfigError
    from tta_engine.ort_decoder import OrtDecoder

    art = artifacts.get("tiny-llama", "fp32")
    with pytest.raises(ConfigError, match="--precision fp16"):
        OrtDecoder(art.file("model.onnx"), art.manifest["decoder"], device="cuda", cuda_graph=True)


@needs_ort
@pytest.mark.parametrize("precision", ["fp16"])
def test_ort_cuda_graph_decode_equals_uncaptured_decode(artifacts, precision):
    """Decode steps captured and replayed as CUDA graphs give the uncaptured path's tokens, request after
    request (each request's cache gets its own graph, released when the cache closes)."""
    from tta_engine.ort_decoder import OrtDecoder

    art = artifacts.get("tiny-llama", precision)
    meta = art.manifest["decoder"]
    plain = OrtDecoder(art.file("model.onnx"), meta, device="cuda")
    graph = OrtDecoder(art.file("model.onnx"), meta, device="cuda", cuda_graph=True)
    assert graph.cuda_graph and graph.static_decode
    rng = np.random.default_rng(8)
    for size in (9, 23):
        prompt = rng.integers(3, meta["vocab_size"], size=size)
        want, want_rows = _greedy(plain, prompt)
        got, got_rows = _greedy(graph, prompt)
        assert got == want
        np.testing.assert_allclose(got_rows, want_rows, atol=2e-3, rtol=2e-3)


@needs_ort
def test_batched_scheduler_on_cuda_equals_cpu(artifacts, tiny_configs):
    """Row packing, prefix reuse and KV growth on device memory give the CPU's tokens."""
    from tta_engine.runtime import open_artifact_lm
    from tta_engine.scheduler import BatchScheduler

    cfg = tiny_configs["tiny-llama"]
    art = artifacts.get(cfg.name, "fp32")
    prompts = [[1] + list(range(10, 40)) + [k] for k in (50, 60, 70)] + [[1, 20, 21, 22]]

    def run(device: str):
        lm = open_artifact_lm(art, cfg, device=device)
        assert lm.device.startswith(device)
        sched = BatchScheduler(lm, max_batch=3, initial_capacity=8, prefix_cache_entries=4)
        try:
            return two_turns(sched, lm, prompts)
        finally:
            sched.close()
            lm.close()

    assert run("cuda") == run("cpu")


@needs_ort
def test_manager_reports_the_gpu(artifacts, tiny_configs):
    from tta_engine.manager import TransformersModelManager

    cfg = tiny_configs["tiny-llama"]
    artifacts.get(cfg.name, "fp32")
    mgr = TransformersModelManager({cfg.name: cfg}, artifacts_root=artifacts.root / "auto", device="auto")
    text = asyncio.run(mgr.generate(MSGS, cfg.name, max_tokens=8, temperature=0))
    assert isinstance(text, str)
    assert mgr.stats()[cfg.name]["device"] == "cuda:0"
    mgr.unload_model(cfg.name)


@needs_ort
def test_ort_cuda_embeddings_equal_cpu(artifacts):
    from tta_engine.embeddings import OrtEncoder

    pytest.importorskip("optimum.exporters.onnx", reason="encoders are exported with Optimum")
    pytest.importorskip("sentence_transformers", reason="encoder export validates against sentence-transformers")
    art = artifacts.get("tiny-bert", "fp32")
    texts = ["a calm lake", "an anxious night", "dragons and gold", "x"]
    a = OrtEncoder(art.path, device="cuda").encode(texts)
    b = OrtEncoder(art.path, device="cpu").encode(texts)
    assert float((a * b).sum(1).min()) >= 0.9999


@needs_torch
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_torch_cuda_static_cache_equals_dynamic_and_tracks_cpu(tiny_configs, arch):
    from tta_engine.runtime import open_torch_lm
    from tta_engine.torch_backend import TorchDecoder

    cfg = tiny_configs[f"tiny-{arch}"]
    gpu = open_torch_lm(cfg, device="cuda")
    assert gpu.device == "cuda:0" and gpu.backend.device.type == "cuda" and gpu.backend.static_cache
    static = gpu.generate(MSGS, temperature=0, max_new_tokens=32, min_new_tokens=32)["token_ids"]
    gpu.backend = TorchDecoder(gpu.backend.model, gpu.backend.context_length, static_cache=False)
    dynamic = gpu.generate(MSGS, temperature=0, max_new_tokens=32, min_new_tokens=32)["token_ids"]
    assert static == dynamic
    cpu = open_torch_lm(cfg, device="cpu")  # fp32: teacher-forced top-1 of the bf16/fp16 GPU weights
    ids = np.array([cpu.encode_prompt(MSGS) + static])
    rows = [dec.forward(dec.new_cache(1, ids.shape[1]), ids, all_logits=True)[0] for dec in (gpu.backend, cpu.backend)]
    assert float(np.mean(rows[0].argmax(-1) == rows[1].argmax(-1))) >= 0.8


@needs_torch
@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_torch_cuda_bitsandbytes(tiny_configs, quant):
    pytest.importorskip("bitsandbytes")
    import dataclasses

    from tta_engine.runtime import open_torch_lm

    cfg = dataclasses.replace(tiny_configs["tiny-llama"], quantization=quant, backend="torch")
    lm = open_torch_lm(cfg, device="cuda")
    assert any("Linear8bitLt" in type(m).__name__ or "Linear4bit" in type(m).__name__
               for m in lm.backend.model.modules())
    out = lm.generate(MSGS, temperature=0, max_new_tokens=16, min_new_tokens=16)
    assert out["usage"]["completion_tokens"] == 16
