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
import gc
import json
import os
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
    gguf_parsed_once,
    load_tokenizer,
    load_torch_causal_lm,
    resolve_source,
)
from tta_engine.tokenizer import Tokenizer

from . import gate, validate
from .onnx_io import save_onnx
from .quantize import quantize

STAGES = ("load", "export", "optimize", "quantize", "validate", "write")
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"
    out_root: Path | None = None
    graph: str = "auto"  # auto | fused | optimum
    block_size: int = 32
    greedy_steps: int = 32
    # int4 artifacts may carry an int8 graph for prompts: MatMulNBits prefills slowly on CPUs where
    # int8 GEMMs run on VNNI/AMX (SmolLM2, 272 tokens: 337 ms int4 vs 170 ms with it), but its
    # dynamic activation quantization costs fidelity (SmolLM2 greedy agreement 0.48 -> 0.07) and
    # ~170 MB. "int8" or "none"; None: the model config's prefill_graph decides (true: "int8").
    prefill_precision: str | None = None
    cache_dir: str | None = None
    opset: int | None = None
    # publish an artifact whose validation figures fail the gate (export/gate.py), marked low fidelity
    allow_low_fidelity: bool = False
    # int4 activations into 8-bit MatMulNBits: "int8" (one int8 digit, fastest), "int16" (two digits,
    # export/activations.py) or "auto": int8, re-encoded as int16 when its figures miss gate.TARGETS
    activations: str = "auto"


def _peak_rss_gb() -> float | None:
    """This process's peak resident memory so far (Linux VmHWM), for the stage lines; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            line = next((ln for ln in f if ln.startswith("VmHWM:")), None)
        return int(line.split()[1]) / 2**20 if line else None
    except (OSError, ValueError):
        return None


class Progress:
    """Prints one readable line per stage with its duration (to stderr unless told otherwise)."""

    def __init__(self, name: str, stream=None, quiet: bool = False, sink: Callable[[str], Any] | None = None):
        self.name, self.stream, self.quiet, self.sink = name, stream or sys.stderr, quiet, sink
        self.t0 = self.t = time.perf_counter()

    def stage(self, key: str, what: str) -> None:
        self.t = time.perf_counter()
        self._print(f"[{STAGES.index(key) + 1}/{len(STAGES)}] {self.name}: {what} ...")

    def note(self, line: str) -> None:
        self._print(f"      {line}")

    def warn(self, line: str) -> None:
        self._print(f"      WARNING: {line}")

    def done(self, detail: str = "") -> None:
        peak = _peak_rss_gb()
        self._print(f"      done in {time.perf_counter() - self.t:.1f}s" + (f", peak RSS {peak:.1f} GB" if peak else "")
                    + (f" - {detail}" if detail else ""))

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
    """Export ``cfg`` at each precision. Stages 1-3 run once (load, export, optimize, with the fp32 graph
    validated); stages 4-6 (quantize, validate, write) run per precision, each published atomically."""
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
        job = (EncoderExport if cfg.is_embedding else DecoderExport)(cfg, options, progress, Path(work_str))
        job.load()                       # 1
        job.export_and_optimize()        # 2 + 3 (and the fp32 graph validated)
        done = {}
        for precision in precisions:
            progress.name = f"{cfg.name} ({precision})"
            graph, quant_meta = job.quantize(precision)             # 4
            figures = job.validate(precision, graph)                # 5
            done[precision] = job.refine(precision, graph, quant_meta, figures)
        # the gate, before anything is written: a failing precision publishes nothing, nor do the others
        low = gate.check(cfg.name, cfg.model_type, {p: fig for p, (_, _, fig) in done.items()}, cfg.validation,
                         options.allow_low_fidelity)
        for precision, (graph, quant_meta, figures) in done.items():
            progress.name = f"{cfg.name} ({precision})"
            if precision in low:
                progress.warn(f"publishing a LOW-FIDELITY artifact (--allow-low-fidelity): "
                              f"{gate.describe(low[precision]['failed'])}")
            artifacts.append(_write(job, precision, graph, quant_meta, figures, low.get(precision)))  # 6
    return artifacts


def _write(job, precision: str, graph: Path, quant_meta: dict, figures: dict, low_fidelity: dict | None) -> Artifact:
    """Stage 6: assemble the artifact in a staged directory, add the manifest, publish atomically."""
    cfg, progress = job.cfg, job.progress
    final = artifact_dir(job.options.out_root, cfg.name, precision)
    with staged_artifact(final) as out:
        manifest = job.write_files(precision, graph, quant_meta, figures, out)
        if low_fidelity is not None:
            manifest["validation"]["low_fidelity"] = low_fidelity
        progress.stage("write", f"writing artifact to {final}")
        manifest.update({
            "model": {"name": cfg.name, "model_id": cfg.model_id, "config_file": cfg.file},
            "precision": precision,
            "versions": _versions(),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "export_seconds": round(time.perf_counter() - progress.t0, 1),
        })
        manifest = write_manifest(out, manifest)
        progress.done(f"{sum(f['size'] for f in manifest['files'].values()) / 1e6:.1f} MB")
    return load_artifact(final)


# --- decoders -----------------------------------------------------------------------------------------

class DecoderExport:
    """A causal LM through the stages: fused GroupQueryAttention graph (Optimum's as the fallback),
    quantized per precision (int4 artifacts also carry an int8 prefill graph), validated against PyTorch."""

    def __init__(self, cfg: ModelConfig, options: ExportOptions, progress: Progress, work: Path):
        self.cfg, self.options, self.progress, self.work = cfg, options, progress, work
        self.quantized: dict[str, tuple[Path, dict]] = {}  # shared between precisions (int4's prefill is int8)
        self.prefill: dict[str, Any] | None = None  # the int8 prefill graph of the precision being exported

    def load(self) -> None:
        cfg, progress = self.cfg, self.progress
        progress.stage("load", f"loading {cfg.source.describe()} in PyTorch")
        self.resolved = resolve_source(cfg, self.options.cache_dir)
        with gguf_parsed_once():  # the config, tokenizer and weights read one parse of a GGUF's header
            self.hf_tokenizer = hf_tokenizer = load_tokenizer(cfg, self.resolved)
            self.model = model = load_torch_causal_lm(cfg, self.resolved)
        self.tokenizer = Tokenizer.from_transformers(hf_tokenizer)
        c = model.config
        self.meta: dict[str, Any] = {
            "num_layers": c.num_hidden_layers,
            "num_kv_heads": getattr(c, "num_key_value_heads", c.num_attention_heads),
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "vocab_size": c.vocab_size,
            "context_length": min(int(getattr(c, "max_position_embeddings", 2048)), cfg.context_length or 1 << 30),
            "eos_token_ids": eos_token_ids(model, hf_tokenizer),
            "architecture": c.model_type,
        }
        self.prompts = validate.validation_prompts(self.tokenizer)
        self.refs = validate.torch_reference(model, self.prompts, self.options.greedy_steps)
        progress.done(f"{c.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")

    def export_and_optimize(self) -> None:
        """Stages 2-3: the fused graph when a builder covers the architecture and it reproduces PyTorch's
        greedy tokens; otherwise Optimum's export, which must."""
        self.fp32_path = self.fallback_reason = None
        if self._want_fused():
            self._build_fused()
        if self.fp32_path is None:
            self.progress.stage("export", "exporting with Optimum (text-generation-with-past)")
            self.fp32_path = _optimum_export(self.model, self.work / "optimum", "text-generation-with-past",
                                             self.options.opset)
            self.graph = "optimum"
            self.fp32_fig = self._check(self.fp32_path)
            self.progress.done(f"{_node_count(self.fp32_path)} nodes")
            if not self.fp32_fig["greedy_exact"]:
                raise ExportError(f"{self.cfg.name}: the fp32 ONNX graph does not reproduce PyTorch's greedy "
                                  f"tokens: {self.fp32_fig}")
        self.meta["graph"] = self.graph
        self._release_torch()  # the references are computed, the fp32 graph is on disk: quantization reads it

    def _release_torch(self) -> None:
        """Drop the PyTorch weights (keeping the configs the artifact writes)."""
        if self.model is not None:
            self.hf_config, self.generation_config = self.model.config, self.model.generation_config
            self.model = None
            gc.collect()

    def _fills_memory(self) -> bool:
        """True when the fp32 weights (the head counted apart) pass 35% of RAM, i.e. fit about once beside
        PyTorch's copy: then the fused graph streams its weights to disk and PyTorch's copy is dropped before the
        fp32 check, whose session keeps the stored layout (no prepacked second copy)."""
        from .fused import fp32_weight_bytes

        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return False
        return fp32_weight_bytes(self.model) > 0.35 * ram

    def _want_fused(self) -> bool:
        if self.options.graph not in ("auto", "fused"):
            return False
        from .fused import fused_supported

        supported = fused_supported(self.model.config)
        if self.options.graph == "fused" and not supported:
            raise ExportError(f"{self.cfg.name}: no fused graph builder for model type "
                              f"{self.model.config.model_type!r}; use --graph optimum (or auto)")
        return supported

    def _build_fused(self) -> None:
        from .fused import UnsupportedArchitectureError, build_fused_decoder

        progress = self.progress
        progress.stage("export", "Optimum export not needed: the fused builder covers this architecture "
                                 "(Optimum's graph is the fallback)")
        progress.done()
        progress.stage("optimize", "building the fused GroupQueryAttention graph")
        try:
            path = self.work / "fused.onnx"
            large = self._fills_memory()
            info = build_fused_decoder(self.model, path, max_cache_len=self.meta["context_length"],
                                       last_position_logits=True, stream_weights=True if large else None)
            self.graph = "fused"
            if large:
                progress.note("large for this machine's memory: weights streamed to disk, PyTorch's copy "
                              "released before the fp32 check")
                self._release_torch()
            fig = self._check(path, {"prepack_weights": False} if large else None)
            if fig["greedy_exact"]:
                self.fp32_path, self.fp32_fig = path, fig
                self.meta["fused"] = info
                progress.done(f"{_node_count(path)} nodes, greedy tokens equal PyTorch")
                return
            self.fallback_reason = f"fused graph failed validation: {fig}"
            if large:
                raise ExportError(f"{self.cfg.name}: {self.fallback_reason}; the Optimum fallback needs the "
                                  "PyTorch weights, released to fit this machine's memory: export on a machine "
                                  "with more memory, or with --graph optimum there")
        except UnsupportedArchitectureError as exc:
            self.fallback_reason = str(exc)
        if self.options.graph == "fused":
            raise ExportError(f"{self.cfg.name}: {self.fallback_reason}")
        progress.done(f"falling back to the unfused graph ({self.fallback_reason})")

    def quantize(self, precision: str) -> tuple[Path, dict]:
        """Stage 4: the graph of ``precision`` (cached), and for int4 the int8 prefill graph beside it."""
        self.prefill = None
        if precision == "fp32":
            return self.fp32_path, {"method": None}
        path, qmeta = self._quantized(precision)
        prefill_precision = self.options.prefill_precision
        if prefill_precision is None:
            prefill_precision = "int8" if self.cfg.prefill_graph else "none"
        if precision == "int4" and self.graph == "fused" and prefill_precision not in (None, "none", precision):
            prefill_path, prefill_meta = self._quantized(prefill_precision)
            shutil.copy2(prefill_path, path.parent / "prefill.onnx")  # next to model_int4.onnx for validation
            self.prefill = {"file": "prefill.onnx", "precision": prefill_precision, "min_tokens": 2,
                            "activations": prefill_meta.get("activations")}
        return path, qmeta

    def _quantized(self, precision: str) -> tuple[Path, dict]:
        if precision not in self.quantized:
            self.progress.stage("quantize", f"quantizing to {precision}")
            path = self.work / f"model_{precision}.onnx"
            qmeta = quantize(self.fp32_path, path, precision, block_size=self.options.block_size)
            self.progress.done(", ".join(f"{k}={v}" for k, v in qmeta.items() if k != "method"))
            if precision == "int4" and self.options.activations == "int16":
                path, qmeta = self._two_digit(path, qmeta)
            self.quantized[precision] = path, qmeta
        return self.quantized[precision]

    def _two_digit(self, path: Path, qmeta: dict) -> tuple[Path, dict]:
        """The int4 graph with two-digit int8 activations into its 8-bit matrices (export/activations.py)."""
        import onnx

        from .activations import split_activations

        self.progress.stage("quantize", "re-encoding 8-bit matrices with two-digit int8 activations")
        model = onnx.load(str(path))
        nodes = split_activations(model)
        out = path.with_name(path.stem + "_a16.onnx")
        save_onnx(model, out)
        self.progress.done(f"{nodes} matrices")
        return out, dict(qmeta, activations={"mode": "int16", "matrices": nodes})

    def refine(self, precision: str, path: Path, qmeta: dict, fig: dict) -> tuple[Path, dict, dict]:
        """``activations="auto"``: an int4 graph whose figures miss gate.TARGETS is re-encoded with
        two-digit activations and validated again; the better of the two (by KL) is kept, and the
        manifest records both figures."""
        if precision != "int4" or self.options.activations != "auto" or "activations" in qmeta:
            return path, qmeta, fig
        missed = gate.failures(fig, gate.targets(self.cfg.model_type, precision, self.cfg.validation))
        one_digit = dict(qmeta, activations={"mode": "int8", "matrices": 0})
        if not missed:
            return path, one_digit, fig
        self.progress.note(f"int8 activations miss the int4 targets ({gate.describe(missed)}): trying two digits")
        path16, qmeta16 = self._two_digit(path, qmeta)
        if not qmeta16["activations"]["matrices"]:
            return path, one_digit, fig
        fig16 = self.validate(precision, path16)

        def brief(f: dict) -> dict:
            return {k: f[k] for k in ("top1_agreement", "mean_kl_divergence", "greedy_agreement")}

        if fig16["mean_kl_divergence"] <= fig["mean_kl_divergence"]:
            return path16, dict(qmeta16, activations=dict(qmeta16["activations"], int8_figures=brief(fig))), fig16
        one_digit["activations"]["int16_figures"] = brief(fig16)
        return path, one_digit, fig

    def validate(self, precision: str, path: Path) -> dict:
        """Stage 5: teacher-forced logits and greedy tokens against PyTorch (fp32 was checked in stage 3)."""
        if precision == "fp32":
            return self.fp32_fig
        self.progress.stage("validate", f"validating {precision} against PyTorch")
        fig = self._check(path, {"prefill": self.prefill} if self.prefill else None)
        self.progress.done(f"top-1 {fig['top1_agreement']:.3f}, KL {fig['mean_kl_divergence']:.4g}, "
                           f"greedy {fig['greedy_agreement']:.3f}")
        return fig

    def _check(self, path: Path, extra_meta: dict | None = None) -> dict:
        from tta_engine.ort_decoder import OrtDecoder

        # validated on the CPU on every machine: the manifest's figures do not depend on a GPU being there
        dec = OrtDecoder(path, dict(self.meta, graph=self.graph, **(extra_meta or {})), device="cpu")
        try:
            return validate.compare_decoder(self.refs, dec, self.prompts, self.options.greedy_steps)
        finally:
            dec.close()

    def write_files(self, precision: str, path: Path, quant_meta: dict, figures: dict, out: Path) -> dict[str, Any]:
        """Stage 6's files: the graph(s), tokenizer + chat template, configs; returns the manifest body."""
        prefill = self.prefill
        _copy_onnx(path, out / "model.onnx")
        if prefill:
            _copy_onnx(path.parent / "prefill.onnx", out / "prefill.onnx")
        self.hf_tokenizer.save_pretrained(out)  # the directory stays loadable by AutoTokenizer (other tools)
        tokenizer_section = self.tokenizer.save(out)  # what the runtime reads (named in the manifest)
        self.generation_config.save_pretrained(out)
        self.hf_config.save_pretrained(out)
        return {
            "kind": "causal_lm",
            "tokenizer": tokenizer_section,
            "generation": _generation_defaults(self.generation_config),
            "source": _source_manifest(self.cfg, self.resolved),
            "graph": self.graph,
            "decoder": dict(self.meta, node_count=_node_count(path), **({"prefill": prefill} if prefill else {})),
            "quantization": quant_meta,
            "opset": _opset(out / "model.onnx"),
            "validation": {"fp32": self.fp32_fig, precision: figures, "fallback_reason": self.fallback_reason},
        }


# --- encoders -----------------------------------------------------------------------------------------

class EncoderExport:
    """A sentence-transformers model through the stages: Optimum's export, ORT's BERT fusions when they
    keep the cosine, quantized per precision, validated against sentence-transformers."""

    def __init__(self, cfg: ModelConfig, options: ExportOptions, progress: Progress, work: Path):
        self.cfg, self.options, self.progress = cfg, options, progress
        self.stage_dir = work / "encoder"

    def load(self) -> None:
        from sentence_transformers import SentenceTransformer

        self.progress.stage("load", f"loading {self.cfg.source.describe()} with sentence-transformers")
        self.resolved = resolve_source(self.cfg, self.options.cache_dir)
        self.st = SentenceTransformer(str(self.resolved.directory), device="cpu")
        self.hf_model = self.st[0].auto_model.eval()
        self.tokenizer = Tokenizer.from_transformers(self.st.tokenizer)
        self.progress.done(f"{self.hf_model.config.model_type}, dim {_st_dim(self.st)}")

    def export_and_optimize(self) -> None:
        progress, stage_dir, st = self.progress, self.stage_dir, self.st
        progress.stage("export", "exporting with Optimum (feature-extraction)")
        self.raw = raw = _optimum_export(self.hf_model, stage_dir, "feature-extraction", self.options.opset)
        self.st.tokenizer.save_pretrained(stage_dir)  # loadable by AutoTokenizer too (other tools)
        self.tokenizer_section = self.tokenizer.save(stage_dir)  # what the runtime reads
        for f in ST_FILES:
            if (self.resolved.directory / f).is_file():
                shutil.copy2(self.resolved.directory / f, stage_dir / f)
        for pool_dir in self.resolved.directory.glob("*_Pooling"):
            shutil.copytree(pool_dir, stage_dir / pool_dir.name, dirs_exist_ok=True)
        pooling = {"mode": next((m.pooling_mode for m in st if hasattr(m, "pooling_mode")), "mean"),
                   "normalize": any(type(m).__name__ == "Normalize" for m in st),
                   "max_seq_length": int(st.max_seq_length)}
        (stage_dir / "pooling.json").write_text(json.dumps(pooling, indent=2) + "\n")
        progress.done(f"{_node_count(raw)} nodes")

        progress.stage("optimize", "fusing attention / LayerNorm / GELU with ONNX Runtime's transformer optimizer")
        self.unfused_fig = self._check(raw)
        self.graph, self.chosen, self.fused_fig = "optimum", raw, None
        try:
            fused = _ort_fuse_encoder(raw, stage_dir / "fused.onnx", self.hf_model.config)
            self.fused_fig = self._check(fused)
            if self.fused_fig["min_cosine"] >= self.unfused_fig["min_cosine"] - 1e-5:
                self.graph, self.chosen = "optimum+ort-fusions", fused
            progress.done(f"{_node_count(raw)} -> {_node_count(fused)} nodes, min cosine {self.fused_fig['min_cosine']}")
        except Exception as exc:  # noqa: BLE001 - fusion is an optimization; the unfused graph stays valid
            progress.done(f"fusion not applied ({type(exc).__name__}: {exc}); keeping the unfused graph")
        self.fp32_fig = self.fused_fig if self.chosen is not raw else self.unfused_fig
        if self.fp32_fig["min_cosine"] < 0.9999:
            raise ExportError(f"{self.cfg.name}: fp32 encoder cosine vs sentence-transformers is "
                              f"{self.fp32_fig['min_cosine']} < 0.9999")

    def quantize(self, precision: str) -> tuple[Path, dict]:
        if precision == "fp32":
            return self.chosen, {"method": None}
        self.progress.stage("quantize", f"quantizing to {precision}")
        path = self.stage_dir / f"model_{precision}.onnx"
        qmeta = quantize(self.chosen, path, precision, block_size=self.options.block_size, kind="embedding")
        self.progress.done()
        return path, qmeta

    def validate(self, precision: str, path: Path) -> dict:
        if precision == "fp32":
            return self.fp32_fig
        self.progress.stage("validate", f"validating {precision} against sentence-transformers")
        fig = self._check(path)
        self.progress.done(f"min cosine {fig['min_cosine']}")
        return fig

    def refine(self, precision: str, path: Path, qmeta: dict, fig: dict) -> tuple[Path, dict, dict]:
        return path, qmeta, fig

    def _check(self, path: Path) -> dict:
        from tta_engine.embeddings import OrtEncoder

        enc = OrtEncoder(self.stage_dir, model_file=path.name, tokenizer=self.tokenizer, device="cpu")
        try:
            return validate.compare_encoder(self.st, enc)
        finally:
            enc.close()

    def write_files(self, precision: str, path: Path, quant_meta: dict, figures: dict, out: Path) -> dict[str, Any]:
        _copy_onnx(path, out / "model.onnx")
        for p in self.stage_dir.iterdir():
            if p.suffix != ".onnx" and not p.name.endswith(".onnx.data"):
                (shutil.copytree if p.is_dir() else shutil.copy2)(p, out / p.name)
        return {
            "kind": "embedding",
            "tokenizer": self.tokenizer_section,
            "source": _source_manifest(self.cfg, self.resolved),
            "graph": self.graph,
            "encoder": {"dimension": _st_dim(self.st), "node_count": _node_count(out / "model.onnx")},
            "quantization": quant_meta,
            "opset": _opset(out / "model.onnx"),
            "validation": {"fp32_unfused": self.unfused_fig, "fp32_fused": self.fused_fig, precision: figures},
        }


def _generation_defaults(gen) -> dict[str, Any]:
    """The model's own sampling defaults (generation_config.json), for the runtime to read."""
    keys = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")
    return {k: getattr(gen, k, None) for k in keys if getattr(gen, k, None) is not None}


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
