"""Device selection (auto / cpu / cuda / cuda:N) and the device-bound decode path, run with the CPU device.

The device-resident path (KV cache, logits and Optimum's present tensors in ORT-allocated memory,
bound by device name, row operations through PyTorch views) is what a CUDA session uses; here it runs
on the CPU through the same functions and must give the same tokens as the host-numpy path.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import two_turns
from tta_engine.config import model_config_from_dict
from tta_engine.device import CPU, Device, parse_device, resolve_device
from tta_engine.errors import BackendUnavailableError, ConfigError
from tta_engine.kv_memory import HostMemory, OrtValueMemory
from tta_engine.ort_decoder import OrtDecoder


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


no_gpu = pytest.mark.skipif(_ort_has_cuda() or _torch_has_cuda(), reason="a GPU backend is usable here")


@pytest.mark.parametrize("value,expected", [("auto", ("auto", None)), ("cpu", ("cpu", None)),
                                            ("cuda", ("cuda", None)), ("cuda:1", ("cuda", 1)),
                                            (" CUDA:0 ", ("cuda", 0))])
def test_parse_device_accepts_the_four_forms(value, expected):
    assert parse_device(value) == expected


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cpu:1", "cuda:-1", "", "auto:0", "mps", None, 0])
def test_bad_device_strings_are_config_errors(bad):
    with pytest.raises(ConfigError, match="device"):
        parse_device(bad)


def test_config_field_device_is_validated():
    raw = {"model_type": "causal_lm", "source": {"kind": "local", "path": "/x"}}
    assert model_config_from_dict("m", raw).device == "auto"
    assert model_config_from_dict("m", dict(raw, device="cuda:0")).device == "cuda:0"
    with pytest.raises(ConfigError, match=r"model 'm', field 'device'.*'gpu'"):
        model_config_from_dict("m", dict(raw, device="gpu"))
    with pytest.raises(ConfigError, match="field 'device'"):
        model_config_from_dict("m", dict(raw, device=1))


def test_manager_rejects_a_bad_device_at_construction():
    from tta_engine.manager import TransformersModelManager

    with pytest.raises(ConfigError, match="device"):
        TransformersModelManager({}, device="tpu")


def test_cli_rejects_a_bad_device(capsys):
    from tta_engine.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["generate", "m", "hi", "--device", "gpu0"])
    assert exc.value.code == 2
    assert "'gpu0' is not one of" in capsys.readouterr().err


@no_gpu
@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_auto_resolves_to_cpu_without_a_gpu(backend):
    dev = resolve_device("auto", backend)
    assert dev.kind == "cpu" and str(dev) == "cpu"
    assert dev.provider == ("CPUExecutionProvider" if backend == "onnx" else "torch")
    assert resolve_device(None, backend) == dev


@no_gpu
@pytest.mark.parametrize("requested", ["cuda", "cuda:0", "cuda:3"])
def test_explicit_cuda_without_a_gpu_raises_with_the_install_command(requested):
    with pytest.raises(BackendUnavailableError, match=r"pip install 'tta-engine\[gpu\]'"):
        resolve_device(requested, "onnx")
    with pytest.raises(BackendUnavailableError, match=r"pip install torch --index-url .*cu\d+"):
        resolve_device(requested, "torch")


@no_gpu
def test_explicit_cuda_never_falls_back_to_cpu_when_opening(artifacts, tiny_configs):
    from tta_engine.embeddings import open_encoder
    from tta_engine.runtime import open_artifact_lm, open_torch_lm

    cfg = tiny_configs["tiny-llama"]
    art = artifacts.get(cfg.name, "fp32")
    with pytest.raises(BackendUnavailableError):
        open_artifact_lm(art, cfg, device="cuda")
    with pytest.raises(BackendUnavailableError):
        open_torch_lm(cfg, device="cuda")
    emb = tiny_configs["tiny-bert"]
    with pytest.raises(BackendUnavailableError):
        open_encoder(emb, artifacts_root=artifacts.root / "auto", device="cuda",
                     backend="torch")


def test_device_str_and_provider():
    assert str(Device("cuda", 1, "CUDAExecutionProvider")) == "cuda:1"
    assert str(CPU) == "cpu" and not CPU.is_cuda
    assert resolve_device(CPU, "onnx") is CPU


# -- the device-bound decode path on the CPU ----------------------------------------------------------

def _greedy(dec: OrtDecoder, prompt: np.ndarray, steps: int, capacity: int = 4) -> tuple[list[int], list]:
    cache = dec.new_cache(1, capacity)  # small: the buffers grow (and are rebound) while decoding
    logits = dec.forward(cache, prompt[None, :])[0]
    tokens, rows = [], [logits]
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        logits = dec.forward(cache, np.array([[tokens[-1]]]))[0]
        rows.append(logits)
    cache.close()
    return tokens, rows


@pytest.mark.parametrize("arch,graph,static", [("llama", "auto", False), ("llama", "optimum", False),
                                               ("llama", "auto", True), ("gemma3", "auto", True)])
def test_device_resident_path_equals_host_path_token_for_token(artifacts, arch, graph, static):
    """``static``: decode steps on fixed-address bindings with inputs updated in place, the cache at full
    context and a constant total_sequence_length -- what a CUDA graph replays (``cuda_graph=True``)."""
    art = artifacts.get(f"tiny-{arch}", "fp32", graph)
    host = OrtDecoder(art.file("model.onnx"), art.manifest["decoder"], device="cpu")
    resident = OrtDecoder(art.file("model.onnx"), art.manifest["decoder"], device="cpu", device_resident=True,
                          static_decode=static)
    assert resident.static_decode == static and not resident.cuda_graph
    assert isinstance(host.memory, HostMemory) and isinstance(resident.memory, OrtValueMemory)
    prompt = np.random.default_rng(1).integers(3, art.manifest["decoder"]["vocab_size"], size=11)
    want, want_rows = _greedy(host, prompt, 32)
    got, got_rows = _greedy(resident, prompt, 32)
    assert got == want
    for a, b in zip(got_rows, want_rows, strict=True):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)  # same kernels, same memory layout: bit-identical


def test_device_resident_cache_is_ort_memory_and_grows_in_place(artifacts):
    art = artifacts.get("tiny-llama", "fp32")
    dec = OrtDecoder(art.file("model.onnx"), art.manifest["decoder"], device="cpu", device_resident=True)
    cache = dec.new_cache(2, capacity=4)
    before = cache.address
    dec.forward(cache, np.array([[5, 6, 7], [8, 9, 10]]))
    snapshot = dec.memory.to_host(cache.keys[0][:, :, :3])
    dec.forward(cache, np.array([[11], [13]]))
    dec.forward(cache, np.array([[12], [14]]))  # 5 positions > 4: grows, keeps the first three
    assert cache.capacity >= 5 and cache.address != before
    np.testing.assert_array_equal(dec.memory.to_host(cache.keys[0][:, :, :3]), snapshot)
    assert not np.any(dec.memory.to_host(cache.keys[0][:, :, 5:]))


@pytest.mark.parametrize("static", [False, True])
def test_scheduler_on_the_device_resident_path_equals_host_path(artifacts, tiny_configs, static):
    """Batched decode with row packing and prefix reuse (row copies, stored copies) on ORT memory."""
    from tta_engine.runtime import open_artifact_lm
    from tta_engine.scheduler import BatchScheduler

    cfg = tiny_configs["tiny-llama"]
    art = artifacts.get(cfg.name, "fp32")
    prompts = [[1] + list(range(10, 40)) + [k] for k in (50, 60, 70)] + [[1, 20, 21, 22]]

    def run(resident: bool) -> list[list[int]]:
        lm = open_artifact_lm(art, cfg, device="cpu")
        if resident:
            lm.backend = OrtDecoder(art.file("model.onnx"), art.manifest["decoder"], device="cpu",
                                    device_resident=True, static_decode=static)
        sched = BatchScheduler(lm, max_batch=3, initial_capacity=8, prefix_cache_entries=4)
        outs = two_turns(sched, lm, prompts)
        hits = sched.prefix.hits
        sched.close()
        lm.close()
        return outs, hits

    host, host_hits = run(False)
    resident, resident_hits = run(True)
    assert resident == host
    assert host_hits == resident_hits and host_hits > 0


@pytest.mark.parametrize("arch", ["gemma3"])  # sliding-window and full layers
def test_torch_static_cache_equals_dynamic_cache(tiny_configs, arch):
    """The PyTorch fallback's static KV cache (its default on a GPU) runs on the CPU here."""
    from tta_engine.runtime import open_torch_lm
    from tta_engine.torch_backend import TorchDecoder

    cfg = tiny_configs[f"tiny-{arch}"]
    lm = open_torch_lm(cfg, device="cpu")
    assert lm.device == "cpu" and not lm.backend.static_cache  # CPU default: dynamic, as before
    msgs = [{"role": "user", "content": "The lantern flickers."}]
    dynamic = lm.generate(msgs, temperature=0, max_new_tokens=24, min_new_tokens=24)["token_ids"]
    lm.backend = TorchDecoder(lm.backend.model, lm.backend.context_length, static_cache=True)
    cache = lm.backend.new_cache(1, 40)
    assert cache.capacity == 40
    static = lm.generate(msgs, temperature=0, max_new_tokens=24, min_new_tokens=24)["token_ids"]
    assert static == dynamic
    lm.close()
