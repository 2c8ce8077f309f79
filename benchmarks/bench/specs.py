"""Which engines to compare for a model (specs, and skip lines with the reason), and loading them."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .engines import OPTIONAL_ENGINES, EngineUnavailable
from .prepare import prepare_hf_dir, prepare_optimum, prepare_ortgenai, prepare_st_onnx


def optional_available(name: str, engines: dict[str, tuple[str, str]] | None = None) -> tuple[bool, str]:
    """(importable, install hint) of an optional engine (looked up in ``OPTIONAL_ENGINES``)."""
    module, hint = (engines or OPTIONAL_ENGINES)[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return found, hint


def skip_record(model: str, engine: str, reason: str) -> dict[str, str]:
    return {"model": model, "engine": engine, "reason": reason}


def _wanted(only: Sequence[str] | None) -> Callable[[str], bool]:
    """Whether an engine key was asked for: all when ``only`` is None, else an exact or prefix match."""
    def want(key: str) -> bool:
        return only is None or key in only or any(key.startswith(o) for o in only)

    return want


def _tta_specs(cfg, artifacts_root, precisions, threads, want: Callable[[str], bool]
               ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """tta-engine's own artifacts, one per precision: (specs, skipped) with the export command when missing."""
    from tta_engine.artifact import artifact_dir

    specs, skipped = [], []
    for p in precisions:
        key = f"tta-{p}"
        if not want(key):
            continue
        path = artifact_dir(artifacts_root, cfg.name, p)
        if (path / "manifest.json").is_file():
            specs.append({"engine": "tta", "key": key, "label": f"tta-engine {p}", "precision": p,
                          "path": str(path), "threads": threads})
        else:
            skipped.append(skip_record(cfg.name, key, f"no artifact at {path}: run "
                                       f"`tta-engine export {cfg.name} --precision {p}`"))
    return specs, skipped


def _skip_not_installed(model: str, engine: str, package: str, hint: str) -> dict[str, str]:
    return skip_record(model, engine, f"{package} is not installed; add it with `{hint}`")


def lm_engine_specs(cfg, artifacts_root, cache: Path, *, precisions=("int4", "int8", "fp32"), threads=None,
                    only: Sequence[str] | None = None, log: Callable[[str], None] = print
                    ) -> tuple[list[dict[str, Any]], list[dict[str, str]], dict[str, Any]]:
    """The causal-LM engines to compare for ``cfg``: (specs, skipped, info)."""
    want = _wanted(only)
    specs, skipped = _tta_specs(cfg, artifacts_root, precisions, threads, want)
    info: dict[str, Any] = {}
    baselines = [k for k in ("optimum-fp32", "optimum-int8", "torch-fp32", "torch-bnb-8bit", "torch-bnb-4bit",
                             "llama.cpp", "onnxruntime-genai") if want(k)]
    if not baselines:
        return specs, skipped, info
    hf_dir, resolved = prepare_hf_dir(cfg, cache, log)
    info["hf_dir"] = str(hf_dir)
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(hf_dir)
    ctx = min(int(getattr(hf_cfg, "max_position_embeddings", 2048)), cfg.context_length or 1 << 30)
    eos = getattr(hf_cfg, "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else None
    common = {"context_length": ctx, "threads": threads, "eos_token_ids": eos}
    if want("torch-fp32"):
        specs.append({"engine": "torch", "key": "torch-fp32", "label": "Transformers PyTorch fp32",
                      "precision": "fp32", "path": str(hf_dir), **common})
    if want("optimum-fp32") or want("optimum-int8"):
        try:
            opt = prepare_optimum(hf_dir, cache, log)
            info["optimum_int8_config"] = opt["int8"]["qconfig"]
            for p in ("fp32", "int8"):
                if want(f"optimum-{p}"):
                    specs.append({"engine": "optimum", "key": f"optimum-{p}", "label": f"Optimum ORT {p}",
                                  "precision": p, "path": opt[p]["path"], "file_name": opt[p]["file_name"],
                                  **common})
        except Exception as exc:  # noqa: BLE001 - a failed baseline is reported, not fatal
            skipped.append(skip_record(cfg.name, "optimum", f"Optimum export failed: {type(exc).__name__}: {exc}"))
    for bits in ("8bit", "4bit"):
        key = f"torch-bnb-{bits}"
        if not want(key):
            continue
        ok, hint = optional_available("bitsandbytes")
        if ok:
            specs.append({"engine": "torch", "key": key, "label": f"Transformers + bitsandbytes {bits}",
                          "precision": bits, "path": str(hf_dir), "quantization": bits, **common})
        else:
            skipped.append(_skip_not_installed(cfg.name, key, "bitsandbytes", hint))
    if want("llama.cpp"):
        ok, hint = optional_available("llama.cpp")
        if not ok:
            skipped.append(_skip_not_installed(cfg.name, "llama.cpp", "llama-cpp-python", hint))
        elif not resolved.gguf_file:
            skipped.append(skip_record(cfg.name, "llama.cpp", "the model's source is not a GGUF file"))
        else:
            gguf = resolved.directory / resolved.gguf_file
            quant = gguf.stem.rsplit(".", 1)[-1] if "." in gguf.stem else "gguf"
            specs.append({"engine": "llama.cpp", "key": "llama.cpp", "label": f"llama.cpp GGUF {quant}",
                          "precision": quant, "path": str(gguf), "n_ctx": min(ctx, 4096), **common})
    if want("onnxruntime-genai"):
        ok, hint = optional_available("onnxruntime-genai")
        if not ok:
            skipped.append(_skip_not_installed(cfg.name, "onnxruntime-genai", "onnxruntime-genai", hint))
        else:
            try:
                path = prepare_ortgenai(hf_dir, cache, log)
                specs.append({"engine": "ortgenai", "key": "onnxruntime-genai", "label": "onnxruntime-genai int4",
                              "precision": "int4", "path": str(path), **common})
            except Exception as exc:  # noqa: BLE001
                skipped.append(skip_record(cfg.name, "onnxruntime-genai",
                                           f"its model builder failed: {type(exc).__name__}: {exc}"))
    return specs, skipped, info


def emb_engine_specs(cfg, artifacts_root, cache: Path, *, precisions=("fp32", "int8"), threads=None,
                     only: Sequence[str] | None = None, log: Callable[[str], None] = print
                     ) -> tuple[list[dict[str, Any]], list[dict[str, str]], dict[str, Any]]:
    """The embedding engines to compare for ``cfg``: (specs, skipped, info)."""
    from tta_engine.sources import resolve_source

    want = _wanted(only)
    specs, skipped = _tta_specs(cfg, artifacts_root, precisions, threads, want)
    info: dict[str, Any] = {}
    src = resolve_source(cfg).directory
    if want("st-torch"):
        specs.append({"engine": "st", "key": "st-torch", "label": "sentence-transformers PyTorch",
                      "precision": "fp32", "path": str(src), "backend": "torch"})
    if want("st-onnx"):
        try:
            st = prepare_st_onnx(src, cache, log)
            info["st_onnx_int8_config"] = st["int8"]["qconfig"]
            specs.append({"engine": "st", "key": "st-onnx", "label": "sentence-transformers ONNX",
                          "precision": "fp32", "path": st["fp32"]["path"], "backend": "onnx"})
            if want("st-onnx-int8"):
                specs.append({"engine": "st", "key": "st-onnx-int8", "label": "sentence-transformers ONNX int8",
                              "precision": "int8", "path": st["int8"]["path"], "backend": "onnx",
                              "file_name": st["int8"]["file_name"]})
        except Exception as exc:  # noqa: BLE001
            skipped.append(skip_record(cfg.name, "st-onnx", f"ONNX backend export failed: {type(exc).__name__}: {exc}"))
    return specs, skipped, info


def load_engines(specs: Sequence[dict[str, Any]], make: Callable, model: str, skipped: list,
                 log: Callable[[str], None] = print) -> list:
    """Load each engine (in-process), timing it; a failure becomes a 'skipped' line, not an error."""
    engines = []
    for spec in specs:
        try:
            eng = make(spec)
            t0 = time.perf_counter()
            eng.load()
            eng.load_s = time.perf_counter() - t0
            engines.append(eng)
            log(f"  loaded {eng.label} in {eng.load_s:.2f}s")
        except EngineUnavailable as exc:
            skipped.append(skip_record(model, spec["key"], str(exc)))
        except Exception as exc:  # noqa: BLE001 - e.g. bitsandbytes without CPU support
            skipped.append(skip_record(model, spec["key"], f"failed to load: {type(exc).__name__}: {exc}"))
            log(f"  {spec['key']}: failed to load ({type(exc).__name__}: {exc})")
    return engines
