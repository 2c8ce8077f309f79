"""The pieces behind the scripts and the bench command: one model's decode or embedding comparison,
and the whole suite (``run_bench``)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .concurrency import bench_concurrency, bench_manager_overhead
from .engines import TtaLM, make_emb_engine, make_lm_engine
from .fidelity import common_prefix_fraction, lm_fidelity
from .measure import decode_summary, measure_context, measure_decode, measure_embed
from .memory import load_with_rss, memory_figures
from .prompts import chat_prompt_ids, embedding_corpus
from .report import machine_info, write_results
from .settings import DEFAULT_MODELS, BenchSettings
from .specs import emb_engine_specs, lm_engine_specs, skip_record
from .targets import target_ratios


def _resolve_configs(models, config_path=None) -> list:
    from tta_engine.config import get_config, load_model_configs

    configs = None
    out = []
    for m in models:
        if isinstance(m, str):
            configs = configs if configs is not None else load_model_configs(config_path)
            out.append(get_config(configs, m))
        else:
            out.append(m)
    return out


def _load_engines_for(cfg, engine_specs: Callable, make: Callable, artifacts_root, out_dir, settings: BenchSettings,
                      engines: Sequence[str] | None, log: Callable[[str], None]) -> tuple[list, list, dict]:
    """Prepare ``cfg``'s engines (baseline files cached under <out_dir>/cache/<model>/) and load them:
    (loaded engines, skipped lines, info)."""
    cache = Path(out_dir) / "cache" / cfg.name
    log(f"[{cfg.name}] preparing engines")
    specs, skipped, info = engine_specs(cfg, artifacts_root, cache, threads=settings.threads, only=engines, log=log)
    for spec in specs:
        if spec["engine"] == "tta":
            spec["device"] = settings.device or cfg.device
            if settings.device:
                spec["label"] += f" --device {settings.device}"
    loaded = load_with_rss(specs, make, cfg.name, skipped, log, delta=settings.rss == "delta")
    return loaded, skipped, info


def compare_decode(cfg, *, artifacts_root=None, out_dir: Path = Path("bench-results"),
                   settings: BenchSettings | None = None, engines: Sequence[str] | None = None,
                   context: bool = False, concurrency: bool = False, fidelity: bool | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Side-by-side causal-LM comparison for one model (task A); with ``context`` / ``concurrency`` also
    the sweeps of the full bench. Returns the model's result record (with ``skipped`` lines)."""
    settings = settings or BenchSettings()
    loaded, skipped, info = _load_engines_for(cfg, lm_engine_specs, make_lm_engine, artifacts_root, out_dir,
                                              settings, engines, log)
    rec: dict[str, Any] = {"kind": "causal_lm", "info": info, "engines": {}, "skipped": skipped}
    if not loaded:
        rec["targets"] = target_ratios({}, None)
        return rec
    tokenizer = _tokenizer_for(loaded, info)
    ctx_limit = min(e.context_length for e in loaded)
    # ~270 tokens with SmolLM2's template; cut (keeping the end) to prompt_tokens or to what fits the context
    ids = chat_prompt_ids(tokenizer, max(8, min(settings.prompt_tokens, ctx_limit - settings.new_tokens - 1)))
    rec["prompt_tokens"] = len(ids)
    log(f"[{cfg.name}] decode: {len(ids)}-token chat prompt, {settings.new_tokens} new tokens, "
        f"{settings.reps} reps x {len(loaded)} engines")
    samples = measure_decode(loaded, ids, settings.new_tokens, settings.reps, warmup_tokens=settings.warmup_tokens,
                             pause_s=settings.pause_s, log=log)
    loaded = [e for e in loaded if e.key in samples]
    ref_tokens = samples["torch-fp32"][0].token_ids if samples.get("torch-fp32") else None
    for e in loaded:
        r = {"label": e.label, "family": e.family, "precision": e.precision, **decode_summary(samples[e.key])}
        if ref_tokens is not None and samples[e.key]:
            r["greedy_match_vs_torch"] = common_prefix_fraction(samples[e.key][0].token_ids, ref_tokens)
        rec["engines"][e.key] = r
    for e in loaded:
        if getattr(e, "error", None):
            skipped.append(skip_record(cfg.name, e.key, f"failed while running: {e.error}"))
    if settings.fidelity if fidelity is None else fidelity:
        log(f"[{cfg.name}] fidelity vs fp32 PyTorch")
        torch_eng = next((e for e in loaded if e.key == "torch-fp32"), None)
        figs = lm_fidelity([e for e in loaded if e.key != "torch-fp32"], info.get("hf_dir"), tokenizer,
                           settings.greedy_steps, reference=getattr(torch_eng, "model", None), log=log)
        for k, f in figs.items():
            rec["engines"][k]["fidelity"] = f
    if context:
        lengths = [L for L in settings.context_lengths if L + settings.context_new_tokens <= ctx_limit]
        log(f"[{cfg.name}] tok/s vs context length {lengths}")
        rec["context"] = measure_context(loaded, tokenizer, lengths, settings.context_new_tokens,
                                         settings.context_reps, pause_s=settings.pause_s, log=log)
    if settings.rss == "subprocess":
        log(f"[{cfg.name}] cold start and peak RSS (one subprocess per engine)")
    for k, v in memory_figures(loaded, "lm", settings.rss, log).items():
        rec["engines"][k]["memory"] = v
    for e in loaded:
        e.close()
    if concurrency:
        log(f"[{cfg.name}] concurrent streams through the manager")
        rec["concurrency"] = _guard(lambda: bench_concurrency(
            cfg, artifacts_root, settings.streams, settings.stream_new_tokens, _fit_prompt(settings, ctx_limit),
            threads=settings.threads, log=log))
        log(f"[{cfg.name}] manager overhead")
        rec["manager_overhead"] = _guard(lambda: bench_manager_overhead(
            cfg, artifacts_root, settings.stream_new_tokens, settings.overhead_reps, _fit_prompt(settings, ctx_limit),
            threads=settings.threads, pause_s=settings.pause_s, log=log))
    rec["targets"] = target_ratios(rec["engines"], None)
    return rec


def _fit_prompt(settings: BenchSettings, ctx_limit: int) -> int:
    return max(8, min(settings.prompt_tokens, ctx_limit - settings.stream_new_tokens - 1))


def _guard(fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others
        return {"skipped": f"failed: {type(exc).__name__}: {exc}"}


def _tokenizer_for(engines, info):
    from transformers import AutoTokenizer

    for e in engines:
        if isinstance(e, TtaLM):
            return e.lm.tokenizer
    return AutoTokenizer.from_pretrained(info["hf_dir"])


def compare_embed(cfg, *, artifacts_root=None, out_dir: Path = Path("bench-results"),
                  settings: BenchSettings | None = None, engines: Sequence[str] | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Side-by-side sentence-embedding comparison for one model. Returns the model's result record (with
    ``skipped`` lines)."""
    settings = settings or BenchSettings()
    loaded, skipped, info = _load_engines_for(cfg, emb_engine_specs, make_emb_engine, artifacts_root, out_dir,
                                              settings, engines, log)
    rec: dict[str, Any] = {"kind": "embedding", "info": info, "engines": {}, "skipped": skipped,
                           "sentences": settings.emb_sentences}
    if loaded:
        corpus = embedding_corpus(settings.emb_sentences)
        log(f"[{cfg.name}] embeddings: {len(corpus)} sentences, batch {settings.emb_batch_size}")
        ref = "st-torch" if any(e.key == "st-torch" for e in loaded) else None
        figs = measure_embed(loaded, corpus, settings.emb_batch_size, settings.emb_reps, settings.emb_single_reps,
                             reference_key=ref, pause_s=settings.pause_s, log=log)
        mem = memory_figures(loaded, "emb", settings.rss, log)
        for e in loaded:
            rec["engines"][e.key] = {"label": e.label, "family": e.family, "precision": e.precision,
                                     **figs[e.key], "memory": mem[e.key]}
            e.close()
    rec["targets"] = target_ratios(None, rec["engines"])
    return rec


def run_bench(models: Sequence = DEFAULT_MODELS, out_dir: str | Path = "bench-results", quick: bool = False, *,
              settings: BenchSettings | None = None, artifacts_root=None, config_path=None,
              engines: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole suite for ``models`` (config names or ModelConfig objects); writes results.md,
    results.json, context.png and concurrency.png under ``out_dir`` and returns the results dict."""
    import datetime as dt

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    settings = settings or (BenchSettings.quick() if quick else BenchSettings())
    results: dict[str, Any] = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "quick": quick,
        "machine": machine_info(), "settings": dataclasses.asdict(settings), "models": {}, "skipped": [],
        "rss_note": {"subprocess": "peak RSS = VmHWM of a fresh subprocess per engine that imports numpy, onnxruntime, "
                                   "torch and transformers, loads the engine (cold start, timed) and runs a little; "
                                   "model RSS = peak minus the RSS after those imports.",
                     "delta": "in-process RSS growth while loading each engine (quick mode; rough); "
                              "cold start = in-process load time.",
                     "off": "not measured."}[settings.rss],
    }
    for cfg in _resolve_configs(models, config_path):
        if cfg.is_embedding:
            rec = compare_embed(cfg, artifacts_root=artifacts_root, out_dir=out_dir, settings=settings,
                                engines=engines, log=log)
        else:
            rec = compare_decode(cfg, artifacts_root=artifacts_root, out_dir=out_dir, settings=settings,
                                 engines=engines, context=True, concurrency=True, log=log)
        results["skipped"].extend(rec.pop("skipped"))
        results["models"][cfg.name] = rec
    results["elapsed_s"] = time.perf_counter() - t0
    files = write_results(results, out_dir)
    results["files"] = {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in files.items()}
    for sk in results["skipped"]:
        log(f"skipped {sk['model']} / {sk['engine']}: {sk['reason']}")
    log(f"wrote {files['md']}, {files['json']}, " + ", ".join(str(p) for p in files["plots"]))
    return results
