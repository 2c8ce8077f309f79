"""Preparing the baselines' files, cached under <out>/cache/<model>/: a Transformers fp32 directory,
Optimum's export and int8 quantization, onnxruntime-genai's build, sentence-transformers' ONNX export."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def _staged_dir(final: Path):
    """A temporary sibling directory renamed to ``final`` on success (so a cache is never half-written)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _source_stamp(resolved) -> dict[str, Any]:
    return {"files": {str(p): [p.stat().st_size, int(p.stat().st_mtime)] for p in resolved.files}}


def prepare_hf_dir(cfg, cache: Path, log: Callable[[str], None] = print) -> tuple[Path, Any]:
    """A Transformers fp32 directory of ``cfg``'s weights. GGUF sources are dequantized by Transformers
    (exactly as the export stage does) and saved once with ``save_pretrained``; directories are used as is.
    Returns (directory, resolved source)."""
    from tta_engine.sources import load_tokenizer, load_torch_causal_lm, resolve_source

    resolved = resolve_source(cfg)
    if not resolved.gguf_file:
        return resolved.directory, resolved
    out = cache / "hf-fp32"
    stamp = _source_stamp(resolved)
    meta = out / "bench_source.json"
    if meta.is_file() and json.loads(meta.read_text()) == stamp:
        return out, resolved
    log(f"  preparing {out} (GGUF dequantized by Transformers, saved with save_pretrained) ...")
    with _staged_dir(out) as tmp:
        model = load_torch_causal_lm(cfg, resolved)
        model.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        load_tokenizer(cfg, resolved).save_pretrained(tmp)
        (tmp / "bench_source.json").write_text(json.dumps(stamp))
        del model
    return out, resolved


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def optimum_qconfig_name() -> str:
    """The AutoQuantizationConfig preset that matches this CPU (dynamic, per-channel)."""
    flags = cpu_flags()
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def prepare_optimum(hf_dir: Path, cache: Path, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Optimum's own export of the same weights (``ORTModelForCausalLM.from_pretrained(dir, export=True)``)
    and its int8 quantization (``ORTQuantizer`` + ``AutoQuantizationConfig.<cpu>(is_static=False,
    per_channel=True)``, i.e. dynamic per-channel int8). Returns {precision: {path, file_name, qconfig}}."""
    from optimum.onnxruntime import ORTModelForCausalLM, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    fp32 = cache / "optimum-fp32"
    if not (fp32 / "model.onnx").is_file():
        log(f"  exporting {hf_dir} with Optimum -> {fp32} ...")
        with _staged_dir(fp32) as tmp:
            ORTModelForCausalLM.from_pretrained(hf_dir, export=True).save_pretrained(tmp)
    qname = optimum_qconfig_name()
    int8 = cache / f"optimum-int8-{qname}"
    if not any(int8.glob("*.onnx")):
        log(f"  quantizing with Optimum ORTQuantizer ({qname}, dynamic, per-channel) -> {int8} ...")
        with _staged_dir(int8) as tmp:
            quantizer = ORTQuantizer.from_pretrained(fp32, file_name="model.onnx")
            qconfig = getattr(AutoQuantizationConfig, qname)(is_static=False, per_channel=True)
            quantizer.quantize(quantization_config=qconfig, save_dir=tmp)
            for f in ("config.json", "generation_config.json"):
                if (fp32 / f).is_file() and not (tmp / f).is_file():
                    shutil.copy2(fp32 / f, tmp / f)
    int8_file = sorted(p.name for p in int8.glob("*.onnx"))[0]
    return {"fp32": {"path": str(fp32), "file_name": "model.onnx", "qconfig": None},
            "int8": {"path": str(int8), "file_name": int8_file,
                     "qconfig": f"AutoQuantizationConfig.{qname}(is_static=False, per_channel=True)"}}


def prepare_ortgenai(hf_dir: Path, cache: Path, log: Callable[[str], None] = print) -> Path:
    """onnxruntime-genai's builder on the fp32 weights directory (int4, CPU)."""
    out = cache / "ortgenai-int4"
    if not (out / "genai_config.json").is_file():
        import subprocess

        log(f"  building an onnxruntime-genai int4 model -> {out} ...")
        with _staged_dir(out) as tmp:
            done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
                                   "-o", str(tmp), "-p", "int4", "-e", "cpu", "-c", str(cache / "ortgenai-tmp")],
                                  capture_output=True, text=True)
            if done.returncode:  # e.g. a builder newer than the installed transformers
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"{last} (or put a model built by its builder in {out})")
    return out


def prepare_st_onnx(src_dir: Path, cache: Path, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """sentence-transformers' ONNX backend files (export once, saved) and its dynamic int8 variant."""
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    out = cache / "st-onnx"
    if not (out / "onnx" / "model.onnx").is_file():
        log(f"  exporting {src_dir} with sentence-transformers backend='onnx' -> {out} ...")
        with _staged_dir(out) as tmp:
            SentenceTransformer(str(src_dir), device="cpu", backend="onnx").save_pretrained(str(tmp))
    qname = optimum_qconfig_name()
    qfile = f"onnx/model_qint8_{qname}.onnx"
    if not (out / qfile).is_file():
        log(f"  quantizing with export_dynamic_quantized_onnx_model({qname!r}) ...")
        model = SentenceTransformer(str(out), device="cpu", backend="onnx")
        export_dynamic_quantized_onnx_model(model, qname, str(out))
    return {"fp32": {"path": str(out), "file_name": None},
            "int8": {"path": str(out), "file_name": qfile, "qconfig": qname}}
