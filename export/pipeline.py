"""The export stage: configured model -> validated, self-describing ONNX artifact.

A readable sequence of named stages:
  1. resolve the source and load the PyTorch model + tokenizer (GGUF is dequantized by Transformers)
  2. export the unfused graph with Optimum (encoders always; decoders when no fused builder applies)
  3. optimize: fused GroupQueryAttention decoder graph / ORT transformer fusions for encoders
  4. quantize (int8 dynamic per-channel, int4 weight-only MatMulNBits; LM head included)
  5. validate against PyTorch (fp32 must reproduce greedy tokens exactly, or the export fails)
  6. write the artifact atomically with its manifest (hashes, versions, validation figures)
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tta_engine.artifact import (
    Artifact,
    artifact_dir,
    export_lock,
    load_artifact,
    remove_stale_staging,
    sha256_file,
    staged_artifact,
    write_manifest,
)
from tta_engine.config import PRECISIONS, ModelConfig
from tta_engine.errors import ExportError
from tta_engine.sources import (
    ResolvedSource,
    eos_token_ids,
    load_tokenizer,
    load_torch_causal_lm,
    resolve_source,
)

from . import validate
from .quantize import quantize, save_onnx

STAGES = ("load", "export", "optimize", "quantize", "validate", "write")
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"
    out_root: Path | None = None
    graph: str = "auto"  # auto | fused | optimum
    block_size: int = 32
    greedy_steps: int = 32
    # int4 artifacts also carry an int8 graph for prompts: MatMulNBits prefills slowly on CPUs where
    # int8 GEMMs run on VNNI/AMX (SmolLM2, 272 tokens: 357 ms int4 vs 97 ms int8). None to omit it.
    prefill_precision: str | None = "int8"
    cache_dir: str | None = None
    opset: int | None = None


class Progress:
    """Prints one readable line per stage with its duration (to stderr unless told otherwise)."""

    def __init__(self, name: str, stream=None, quiet: bool = False, sink: Callable[[str], Any] | None = None):
        self.name, self.stream, self.quiet, self.sink = name, stream or sys.stderr, quiet, sink
        self.t0 = self.t = time.perf_counter()

    def stage(self, key: str, what: str) -> None:
        self.t = time.perf_counter()
        self._print(f"[{STAGES.index(key) + 1}/{len(STAGES)}] {self.name}: {what} ...")

    def done(self, detail: str = "") -> None:
        self._print(f"      done in {time.perf_counter() - self.t:.1f}s" + (f" - {detail}" if detail else ""))

    def _print(self, line: str) -> None:
        if self.sink is not None:
            self.sink(line)
        elif not self.quiet:
            print(line, file=self.stream, flush=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("tta-engine", "onnxruntime", "onnx", "optimum", "optimum-onnx", "transformers", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _source_manifest(cfg: ModelConfig, resolved: ResolvedSource) -> dict[str, Any]:
    return {
        "description": cfg.source.describe(),
        "kind": cfg.source.kind,
        "revision": cfg.source.revision,
        "input_hashes": {p.name if resolved.gguf_file else p.relative_to(resolved.directory).as_posix():
                         sha256_file(p) for p in resolved.files},
    }


def export_model(cfg: ModelConfig, options: ExportOptions = ExportOptions(), *, quiet: bool = False,
                 progress: Callable[[str], Any] | None = None) -> Artifact:
    """Export ``cfg`` at ``options.precision``; returns the published, verified artifact.
    ``progress`` receives the stage lines instead of stderr."""
    return export_models(cfg, [options.precision], options, quiet=quiet, progress=progress)[0]


def export_models(cfg: ModelConfig, precisions: list[str], options: ExportOptions = ExportOptions(), *,
                  quiet: bool = False, progress: Callable[[str], Any] | None = None) -> list[Artifact]:
    """Export ``cfg`` at each precision. The source is loaded, exported, fused and validated at fp32 once;
    each precision is then quantized, validated and published atomically on its own."""
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise ExportError(f"precision {bad[0] if bad else None!r} is not one of {', '.join(PRECISIONS)}")
    root = artifact_dir(options.out_root, cfg.name, precisions[0]).parent
    with export_lock(root):  # one export per model at a time; what dead exports left behind goes
        remove_stale_staging(root)
        return _export_locked(cfg, precisions, options, root,
                              Progress(f"{cfg.name} ({', '.join(precisions)})", quiet=quiet, sink=progress))


def _export_locked(cfg: ModelConfig, precisions: list[str], options: ExportOptions, root: Path,
                   progress: Progress) -> list[Artifact]:
    artifacts = []
    with tempfile.TemporaryDirectory(prefix=".work-", dir=root) as work_str:
        prepare = _prepare_encoder if cfg.is_embedding else _prepare_decoder
        finish = prepare(cfg, options, progress, Path(work_str))
        for precision in precisions:
            final = artifact_dir(options.out_root, cfg.name, precision)
            progress.name = f"{cfg.name} ({precision})"
            with staged_artifact(final) as out:
                manifest = finish(precision, out)
                progress.stage("write", f"writing artifact to {final}")
                manifest.update({
                    "model": {"name": cfg.name, "model_id": cfg.model_id, "config_file": cfg.file},
                    "precision": precision,
                    "versions": _versions(),
                    "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "export_seconds": round(time.perf_counter() - progress.t0, 1),
                })
                manifest = write_manifest(out, manifest)
                progress.done(f"{sum(f['size'] for f in manifest['files'].values()) / 1e6:.1f} MB")
            artifacts.append(load_artifact(final))
    return artifacts


# --- decoders -----------------------------------------------------------------------------------------

def _prepare_decoder(cfg, options, progress, work: Path):
    """Stages 1-3 (+ fp32 validation) once; returns ``finish(precision, out_dir) -> manifest``."""
    from tta_engine.ort_decoder import OrtDecoder

    progress.stage("load", f"loading {cfg.source.describe()} in PyTorch")
    resolved = resolve_source(cfg, options.cache_dir)
    tokenizer = load_tokenizer(cfg, resolved)
    model = load_torch_causal_lm(cfg, resolved)
    context = min(int(getattr(model.config, "max_position_embeddings", 2048)), cfg.context_length or 1 << 30)
    meta: dict[str, Any] = {
        "num_layers": model.config.num_hidden_layers,
        "num_kv_heads": getattr(model.config, "num_key_value_heads", model.config.num_attention_heads),
        "head_dim": getattr(model.config, "head_dim", None)
        or model.config.hidden_size // model.config.num_attention_heads,
        "vocab_size": model.config.vocab_size,
        "context_length": context,
        "eos_token_ids": eos_token_ids(model, tokenizer),
        "architecture": model.config.model_type,
    }
    progress.done(f"{model.config.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")

    prompts = validate.validation_prompts(tokenizer)
    refs = validate.torch_reference(model, prompts, options.greedy_steps)

    def check(path: Path, graph: str, extra_meta: dict | None = None) -> dict:
        # validated on the CPU on every machine: the manifest's figures do not depend on a GPU being there
        dec = OrtDecoder(path, dict(meta, graph=graph, **(extra_meta or {})), device="cpu")
        try:
            return validate.compare_decoder(refs, dec, prompts, options.greedy_steps)
        finally:
            dec.close()

    want_fused = False
    if options.graph in ("auto", "fused"):
        from .fused import UnsupportedArchitectureError, build_fused_decoder, fused_supported

        want_fused = fused_supported(model.config)
    if options.graph == "fused" and not want_fused:
        raise ExportError(f"{cfg.name}: no fused graph builder for model type {model.config.model_type!r}; "
                          "use --graph optimum (or auto)")
    fp32_path, graph, fp32_fig, fallback_reason = None, None, None, None
    if want_fused:
        progress.stage("export", "Optimum export not needed: the fused builder covers this architecture "
                                 "(Optimum's graph is the fallback)")
        progress.done()
        progress.stage("optimize", "building the fused GroupQueryAttention graph")
        try:
            path = work / "fused.onnx"
            info = build_fused_decoder(model, path, max_cache_len=context, last_position_logits=True)
            fig = check(path, "fused")
            if fig["greedy_exact"]:
                fp32_path, graph, fp32_fig = path, "fused", fig
                meta["fused"] = info
                progress.done(f"{_node_count(path)} nodes, greedy tokens equal PyTorch")
            else:
                fallback_reason = f"fused graph failed validation: {fig}"
        except UnsupportedArchitectureError as exc:
            fallback_reason = str(exc)
        if fp32_path is None:
            if options.graph == "fused":
                raise ExportError(f"{cfg.name}: {fallback_reason}")
            progress.done(f"falling back to the unfused graph ({fallback_reason})")
    if fp32_path is None:
        progress.stage("export", "exporting with Optimum (text-generation-with-past)")
        fp32_path = _optimum_export(model, work / "optimum", "text-generation-with-past", options.opset)
        graph = "optimum"
        fp32_fig = check(fp32_path, graph)
        progress.done(f"{_node_count(fp32_path)} nodes")
        if not fp32_fig["greedy_exact"]:
            raise ExportError(f"{cfg.name}: the fp32 ONNX graph does not reproduce PyTorch's greedy tokens: {fp32_fig}")
    meta["graph"] = graph
    source = _source_manifest(cfg, resolved)

    quantized: dict[str, tuple[Path, dict]] = {}

    def quantized_graph(precision: str) -> tuple[Path, dict]:
        if precision not in quantized:  # shared between precisions (int4's prefill graph is int8)
            progress.stage("quantize", f"quantizing to {precision}")
            path = work / f"model_{precision}.onnx"
            qmeta = quantize(fp32_path, path, precision, block_size=options.block_size)
            progress.done(", ".join(f"{k}={v}" for k, v in qmeta.items() if k != "method"))
            quantized[precision] = path, qmeta
        return quantized[precision]

    def finish(precision: str, out: Path) -> dict[str, Any]:
        final_path, final_fig, quant_meta = fp32_path, fp32_fig, {"method": None}
        prefill = None
        if precision != "fp32":
            final_path, quant_meta = quantized_graph(precision)
            prefill_precision = options.prefill_precision
            if precision == "int4" and graph == "fused" and prefill_precision not in (None, "none", precision):
                prefill_path, prefill_meta = quantized_graph(prefill_precision)
                _copy_onnx(prefill_path, out / "prefill.onnx")
                prefill = {"file": "prefill.onnx", "precision": prefill_precision, "min_tokens": 2,
                           "activations": prefill_meta.get("activations")}
                shutil.copy2(out / "prefill.onnx", final_path.parent / "prefill.onnx")
            progress.stage("validate", f"validating {precision} against PyTorch")
            final_fig = check(final_path, graph, {"prefill": prefill} if prefill else None)
            progress.done(f"top-1 {final_fig['top1_agreement']:.3f}, KL {final_fig['mean_kl_divergence']:.4g}, "
                          f"greedy {final_fig['greedy_agreement']:.3f}")
        _copy_onnx(final_path, out / "model.onnx")
        tokenizer.save_pretrained(out)
        model.generation_config.save_pretrained(out)
        model.config.save_pretrained(out)
        return {
            "kind": "causal_lm",
            "source": source,
            "graph": graph,
            "decoder": dict(meta, node_count=_node_count(final_path), **({"prefill": prefill} if prefill else {})),
            "quantization": quant_meta,
            "opset": _opset(out / "model.onnx"),
            "validation": {"fp32": fp32_fig, precision: final_fig, "fallback_reason": fallback_reason},
        }

    return finish


# --- encoders -----------------------------------------------------------------------------------------

def _prepare_encoder(cfg, options, progress, work: Path):
    """Load, export and fuse once; returns ``finish(precision, out_dir) -> manifest``."""
    from sentence_transformers import SentenceTransformer
    from tta_engine.embeddings import OrtEncoder

    progress.stage("load", f"loading {cfg.source.describe()} with sentence-transformers")
    resolved = resolve_source(cfg, options.cache_dir)
    st = SentenceTransformer(str(resolved.directory), device="cpu")
    hf_model = st[0].auto_model.eval()
    progress.done(f"{hf_model.config.model_type}, dim {_st_dim(st)}")

    progress.stage("export", "exporting with Optimum (feature-extraction)")
    stage_dir = work / "encoder"
    raw = _optimum_export(hf_model, stage_dir, "feature-extraction", options.opset)
    st.tokenizer.save_pretrained(stage_dir)
    for f in ST_FILES:
        if (resolved.directory / f).is_file():
            shutil.copy2(resolved.directory / f, stage_dir / f)
    for pool_dir in resolved.directory.glob("*_Pooling"):
        shutil.copytree(pool_dir, stage_dir / pool_dir.name, dirs_exist_ok=True)
    pooling = {"mode": next((m.pooling_mode for m in st if hasattr(m, "pooling_mode")), "mean"),
               "normalize": any(type(m).__name__ == "Normalize" for m in st),
               "max_seq_length": int(st.max_seq_length)}
    (stage_dir / "pooling.json").write_text(json.dumps(pooling, indent=2) + "\n")
    progress.done(f"{_node_count(raw)} nodes")

    def check(name: str) -> dict:
        enc = OrtEncoder(stage_dir, model_file=name, device="cpu")
        try:
            return validate.compare_encoder(st, enc)
        finally:
            enc.close()

    progress.stage("optimize", "fusing attention / LayerNorm / GELU with ONNX Runtime's transformer optimizer")
    unfused_fig = check(raw.name)
    graph, chosen, fused_fig = "optimum", raw, None
    try:
        fused = _ort_fuse_encoder(raw, stage_dir / "fused.onnx", hf_model.config)
        fused_fig = check(fused.name)
        if fused_fig["min_cosine"] >= unfused_fig["min_cosine"] - 1e-5:
            graph, chosen = "optimum+ort-fusions", fused
        progress.done(f"{_node_count(raw)} -> {_node_count(fused)} nodes, min cosine {fused_fig['min_cosine']}")
    except Exception as exc:  # noqa: BLE001 - fusion is an optimization; the unfused graph stays valid
        progress.done(f"fusion not applied ({type(exc).__name__}: {exc}); keeping the unfused graph")
    fp32_fig = fused_fig if chosen is not raw else unfused_fig
    if fp32_fig["min_cosine"] < 0.9999:
        raise ExportError(f"{cfg.name}: fp32 encoder cosine vs sentence-transformers is "
                          f"{fp32_fig['min_cosine']} < 0.9999")
    source = _source_manifest(cfg, resolved)

    def finish(precision: str, out: Path) -> dict[str, Any]:
        final, final_fig, quant_meta = chosen, fp32_fig, {"method": None}
        if precision != "fp32":
            progress.stage("quantize", f"quantizing to {precision}")
            final = stage_dir / f"model_{precision}.onnx"
            quant_meta = quantize(chosen, final, precision, block_size=options.block_size)
            progress.done()
            progress.stage("validate", f"validating {precision} against sentence-transformers")
            final_fig = check(final.name)
            progress.done(f"min cosine {final_fig['min_cosine']}")
        _copy_onnx(final, out / "model.onnx")
        for p in stage_dir.iterdir():
            if p.suffix != ".onnx" and not p.name.endswith(".onnx.data"):
                (shutil.copytree if p.is_dir() else shutil.copy2)(p, out / p.name)
        return {
            "kind": "embedding",
            "source": source,
            "graph": graph,
            "encoder": {"dimension": _st_dim(st), "node_count": _node_count(out / "model.onnx")},
            "quantization": quant_meta,
            "opset": _opset(out / "model.onnx"),
            "validation": {"fp32_unfused": unfused_fig, "fp32_fused": fused_fig, precision: final_fig},
        }

    return finish


def _st_dim(st) -> int:
    get = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    return int(get())


def _ort_fuse_encoder(src: Path, dst: Path, config) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(src), model_type="bert", num_heads=config.num_attention_heads,
                         hidden_size=config.hidden_size, opt_level=1)
    opt.save_model_to_file(str(dst))
    return dst


# --- helpers ------------------------------------------------------------------------------------------

def _optimum_export(model, out_dir: Path, task: str, opset: int | None) -> Path:
    from optimum.exporters.onnx import onnx_export_from_model

    onnx_export_from_model(model, out_dir, task=task, opset=opset, do_validation=False)
    return out_dir / "model.onnx"


def _copy_onnx(src: Path, dst: Path) -> None:
    import onnx

    save_onnx(onnx.load(str(src)), dst)  # re-saved, so external data (if any) is named after dst


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
