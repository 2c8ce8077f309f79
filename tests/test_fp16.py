"""The fp16 export precision (GPU artifacts), validated and run on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
from tta_engine.ort_decoder import OrtDecoder


def _teacher_forced(dec: OrtDecoder, ids: np.ndarray) -> np.ndarray:
    cache = dec.new_cache(1, 8)
    return np.stack([dec.forward(cache, ids[None, i : i + 1])[0] for i in range(len(ids))])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fp16_artifact_validates_on_cpu_and_agrees_with_fp32(artifacts, arch):
    fp16 = artifacts.get(f"tiny-{arch}", "fp16")
    fp32 = artifacts.get(f"tiny-{arch}", "fp32")
    m = fp16.manifest
    assert m["precision"] == "fp16" and m["quantization"]["bits"] == 16 and m["quantization"]["kv_cache"] == "fp16"
    assert m["validation"]["fp16"]["top1_agreement"] >= 0.97  # against PyTorch fp32, at export
    meta = m["decoder"]
    dec16 = OrtDecoder(fp16.file("model.onnx"), meta, device="cpu")
    dec32 = OrtDecoder(fp32.file("model.onnx"), fp32.manifest["decoder"], device="cpu")
    assert dec16.kv_dtype == np.float16 and dec16.new_cache(1, 4).keys[0].dtype == np.float16
    ids = np.random.default_rng(3).integers(3, meta["vocab_size"], size=48)
    a, b = _teacher_forced(dec16, ids), _teacher_forced(dec32, ids)
    assert a.dtype == np.float32
    top1 = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    assert top1 >= 0.97, top1
    assert 0 < float(np.abs(a - b).max()) < 0.1  # really half precision, and close


def test_fp16_artifact_generates_through_the_runtime(artifacts, tiny_configs):
    from tta_engine.runtime import open_artifact_lm

    cfg = tiny_configs["tiny-llama"]
    lm16 = open_artifact_lm(artifacts.get(cfg.name, "fp16"), cfg, device="cpu")
    lm32 = open_artifact_lm(artifacts.get(cfg.name, "fp32"), cfg, device="cpu")
    msgs = [{"role": "user", "content": "The lantern flickers."}]
    out16 = lm16.generate(msgs, temperature=0, max_new_tokens=16, min_new_tokens=16)
    out32 = lm32.generate(msgs, temperature=0, max_new_tokens=16, min_new_tokens=16)
    assert out16["usage"]["completion_tokens"] == 16
    agree = np.mean(np.array(out16["token_ids"]) == np.array(out32["token_ids"]))
    assert agree >= 0.5, (out16["token_ids"], out32["token_ids"])
    lm16.close()
    lm32.close()


def test_fp16_is_a_precision_of_config_and_cli():
    from tta_engine.cli import build_parser
    from tta_engine.config import model_config_from_dict

    raw = {"model_type": "causal_lm", "source": {"kind": "local", "path": "/x"}, "precision": "fp16"}
    assert model_config_from_dict("m", raw).precision == "fp16"
    args = build_parser().parse_args(["export", "m", "--precision", "fp16"])
    assert args.precision == ["fp16"]


def test_fp16_encoder_artifact_matches_fp32(artifacts):
    from tta_engine.embeddings import OrtEncoder

    fp16, fp32 = artifacts.get("tiny-bert", "fp16"), artifacts.get("tiny-bert", "fp32")
    assert fp16.manifest["validation"]["fp16"]["min_cosine"] >= 0.999  # against sentence-transformers
    assert "kv_cache" not in fp16.manifest["quantization"]
    texts = ["a calm lake at night", "I feel anxious", "dragons"]
    a, b = OrtEncoder(fp16.path, device="cpu").encode(texts), OrtEncoder(fp32.path, device="cpu").encode(texts)
    assert a.dtype == np.float32
    cos = (a * b).sum(1)
    assert cos.min() >= 0.999 and not np.array_equal(a, b)
