"""The seed's model sizes (issue 19): tta int4 vs llama.cpp on random-weight models of Gemma-3-1B's and
Phi-4-mini's shapes, in one run.

No hub is reachable, so each model is a GGUF written here with the ``gguf`` package: the real model card's
dimensions, random weights stored directly as Q4_0 blocks (layer matrices) and Q8_0 blocks (the tied
embedding / LM head), norms 1. Both engines read that one file: llama-cpp-python directly, tta-engine
through its normal export (``tta-engine export --precision int4``, which re-encodes the blocks exactly).
The tokenizer is a real one: Gemma 3's (from the Gemma 3 270M GGUF: the same 262,144 tokens) and, for
the Phi-4-mini shape, SmolLM2's BPE padded with unused tokens to Phi-4-mini's 200,064 rows.

- gemma-3-1b: ``google/gemma-3-1b-it`` config.json: hidden 1152, intermediate 6912, 26 layers, 4 heads,
  1 KV head, head_dim 256, vocab 262,144, sliding window 512 (5 local : 1 global), rope 1e6 / 1e4.
- phi-4-mini: ``microsoft/Phi-4-mini-instruct`` config.json: hidden 3072, intermediate 8192, 32 layers,
  24 heads, 8 KV heads, head_dim 128, vocab 200,064, tied embeddings. Written as a ``llama`` GGUF: the
  matrices are the same shapes; Phi-4's partial rotary (96 of 128 dims) and LongRoPE factors change no
  matrix and are left out (speed and memory only).

Per size it prints: decode tok/s at batch 1 and TTFT on a 272-token prompt (medians, alternating
engines), model RSS (a fresh subprocess per engine), artifact vs GGUF bytes, export time and peak export
RSS (an export past 90% of the machine's memory is stopped and reported; llama.cpp is measured anyway).

    .venv/bin/python benchmarks/compare_sizes.py                  # both sizes
    .venv/bin/python benchmarks/compare_sizes.py --size gemma-3-1b --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import bench
import numpy as np
from tta_engine.config import load_model_configs


@dataclass(frozen=True)
class Shape:
    arch: str
    template: str  # the packaged model whose GGUF gives the tokenizer and the metadata layout
    dims: dict[int, int]  # the template's dimension -> this model's (hidden, intermediate, q / kv widths, vocab)
    layers: int
    meta: dict[str, int]  # <arch>.<key> overrides


SHAPES = {
    "gemma-3-1b": Shape("gemma3", "gemma-3-270m", {640: 1152, 2048: 6912}, 26, {
        "embedding_length": 1152, "feed_forward_length": 6912, "attention.head_count": 4,
        "attention.head_count_kv": 1, "attention.key_length": 256, "attention.value_length": 256}),
    "phi-4-mini": Shape("llama", "smollm2-135m-instruct", {576: 3072, 1536: 8192, 192: 1024, 49152: 200064}, 32, {
        "embedding_length": 3072, "feed_forward_length": 8192, "attention.head_count": 24,
        "attention.head_count_kv": 8, "rope.dimension_count": 128, "vocab_size": 200064, "context_length": 4096}),
}
Q4_0_BLOCK, Q8_0_BLOCK = 18, 34  # bytes per 32 weights: fp16 scale + 16 nibble bytes / 32 int8


def _blocks(n_weights: int, kind: str, rng: np.random.Generator, std: float = 0.02) -> np.ndarray:
    """Random Q4_0 / Q8_0 blocks (raw bytes), weights roughly uniform with standard deviation ``std``."""
    n = n_weights // 32
    if kind == "Q4_0":
        out = np.empty((n, Q4_0_BLOCK), np.uint8)
        out[:, :2] = np.full(n, std / 4.6, np.float16).view(np.uint8).reshape(n, 2)
        out[:, 2:] = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    else:
        out = np.empty((n, Q8_0_BLOCK), np.uint8)
        out[:, :2] = np.full(n, std / 73.0, np.float16).view(np.uint8).reshape(n, 2)
        out[:, 2:] = rng.integers(-127, 128, (n, 32), dtype=np.int8).view(np.uint8)
    return out


def write_random_gguf(shape: Shape, template: Path, dst: Path, seed: int = 0) -> Path:
    """``dst``: the template GGUF's metadata and tensor list at ``shape``'s dimensions, random weights."""
    import gguf

    reader = gguf.GGUFReader(str(template))
    t_arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst.with_suffix(".part")), shape.arch)
    vocab = shape.dims.get(49152)  # a padded vocabulary (Phi-4-mini on SmolLM2's tokenizer)
    for field in reader.fields.values():
        name = field.name
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        value, vtype = field.contents(), field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        key = name.split(".", 1)[1] if name.startswith(f"{t_arch}.") else None
        if key is not None:
            name = f"{shape.arch}.{key}"
            value = shape.meta.get(key, shape.layers if key == "block_count" else value)
        elif name == "general.name":
            value = f"random weights, {dst.stem} shape"
        elif vocab and name == "tokenizer.ggml.tokens":
            value = value + [f"<|unused_{i}|>" for i in range(vocab - len(value))]
        elif vocab and name == "tokenizer.ggml.token_type":
            value = value + [gguf.TokenType.NORMAL] * (vocab - len(value))
        writer.add_key_value(name, value, vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    rng = np.random.default_rng(seed)
    layer0 = [t for t in reader.tensors if t.name.startswith("blk.0.")]
    tensors = [t for t in reader.tensors if not t.name.startswith("blk.")]
    for i, t in [(None, t) for t in tensors] + [(i, t) for i in range(shape.layers) for t in layer0]:
        name = t.name if i is None else f"blk.{i}." + t.name.split(".", 2)[2]
        dims = [shape.dims.get(int(d), int(d)) for d in t.shape]  # GGUF order: innermost first
        n = int(np.prod(dims))
        if len(dims) == 1:
            writer.add_tensor(name, np.ones(dims[::-1], np.float32))
            continue
        kind = "Q8_0" if name == "token_embd.weight" else "Q4_0"
        raw = _blocks(n, kind, rng).reshape(*dims[::-1][:-1], -1)
        writer.add_tensor(name, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    os.replace(dst.with_suffix(".part"), dst)
    return dst


def _export(name: str, config: Path, root: Path, limit_gb: float) -> dict:
    """``tta-engine export`` in a subprocess: wall time and peak RSS (wait4's ru_maxrss). Stopped (and
    reported) when its RSS passes ``limit_gb``, before the kernel's OOM killer would pick a process."""
    import psutil

    cmd = [sys.executable, "-m", "tta_engine.cli", "export", name, "--config", str(config), "--precision", "int4",
           "--out", str(root), "--allow-low-fidelity"]  # random weights: figures are reported, not gated
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    watched, stopped = psutil.Process(proc.pid), None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaps it here, with its rusage
        if pid:
            break
        try:
            rss = watched.memory_info().rss / 2**30
        except psutil.NoSuchProcess:  # exited (a zombie until wait4 reaps it) since the last poll
            continue
        if rss > limit_gb and stopped is None:
            stopped = f"stopped at {rss:.1f} GB RSS after {time.perf_counter() - t0:.0f} s (limit {limit_gb:.1f} GB)"
            proc.kill()
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"export_s": round(time.perf_counter() - t0, 1), "export_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "exit": proc.returncode, "stopped": stopped}


def _measure(name: str, cfg, gguf_path: Path, artifact: Path | None, reps: int, new_tokens: int) -> dict:
    """Decode tok/s and TTFT (alternating engines, medians) and model RSS (a subprocess each)."""
    from bench.engines import make_lm_engine
    from bench.measure import decode_summary, measure_decode
    from bench.memory import load_with_rss, memory_figures
    from bench.prompts import chat_prompt_ids

    common = {"context_length": 4096, "threads": None, "eos_token_ids": None}
    specs = [{"engine": "tta", "key": "tta-int4", "label": "tta-engine int4", "precision": "int4",
              "path": str(artifact), **common}] if artifact else []
    specs.append({"engine": "llama.cpp", "key": "llama.cpp", "label": "llama.cpp Q4_0", "precision": "Q4_0",
                  "path": str(gguf_path), "n_ctx": 4096, **common})
    skipped: list = []
    loaded = load_with_rss(specs, make_lm_engine, name, skipped, print, delta=False)
    tta = next((e for e in loaded if e.key == "tta-int4"), None)
    if tta is not None:
        tokenizer = tta.lm.tokenizer
    else:
        from tta_engine.sources import load_tokenizer, resolve_source

        tokenizer = load_tokenizer(cfg, resolve_source(cfg))
    ids = chat_prompt_ids(tokenizer, 272)
    print(f"[{name}] decode: {len(ids)}-token prompt, {new_tokens} new tokens, {reps} reps x {len(loaded)} engines")
    samples = measure_decode(loaded, ids, new_tokens, reps)
    engines = {e.key: {"label": e.label, **decode_summary(samples[e.key])} for e in loaded if samples.get(e.key)}
    for k, v in memory_figures([e for e in loaded if e.key in engines], "lm", "subprocess", print).items():
        engines[k]["memory"] = v
    for e in loaded:
        e.close()
    return {"prompt_tokens": len(ids), "engines": engines, "skipped": skipped}


def _med(e: dict, key: str) -> float:
    return e[key]["median"]


def _row(label: str, e: dict | None) -> str:
    if not e:
        return f"  {label:10} (not measured)"
    mem = e.get("memory", {})
    return (f"  {label:10} decode {_med(e, 'decode_tok_s'):6.1f} tok/s   TTFT {1000 * _med(e, 'ttft_s'):6.0f} ms   "
            f"model RSS {mem.get('model_rss_mb', float('nan')):7.0f} MB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SHAPES), action="append", default=None)
    ap.add_argument("--out", type=Path, default=Path("bench-results/sizes"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", dest="new_tokens", type=int, default=64)
    ap.add_argument("--export-limit-gb", dest="limit_gb", type=float, default=None,
                    help="stop an export whose RSS passes this (default: 90%% of this machine's memory)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import psutil
    from tta_engine.sources import resolve_source

    limit = args.limit_gb or 0.9 * psutil.virtual_memory().total / 2**30
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    packaged = load_model_configs()
    results: dict = {"machine": bench.machine_info(), "sizes": {}}
    isa = ", ".join(results["machine"].get("isa", [])) or "no AVX-512 / VNNI flags"
    print(f"CPU: {results['machine'].get('cpu')} ({results['machine'].get('physical_cores')} cores; {isa}), "
          f"{results['machine'].get('ram_gb')} GB RAM")
    for size in args.size or list(SHAPES):
        shape = SHAPES[size]
        template = resolve_source(packaged[shape.template])
        gguf_path = out / f"{size}-random-q4_0.gguf"
        if not gguf_path.is_file():
            print(f"[{size}] writing {gguf_path} (random weights, the model card's shapes) ...", flush=True)
            write_random_gguf(shape, template.directory / template.gguf_file, gguf_path)
        name = f"{size}-random"
        config = out / f"{size}.toml"
        config.write_text(
            f'[models."{name}"]\nmodel_type = "causal_lm"\ncontext_length = 4096\nmax_tokens = 64\n'
            f'prefill_graph = false\nsource = {{ kind = "gguf", path = "{gguf_path}" }}\n')
        print(f"[{size}] exporting int4 ...", flush=True)
        artifacts = out / "artifacts"
        if (artifacts / name).exists():
            import shutil

            shutil.rmtree(artifacts / name)  # every run measures a whole export
        rec: dict = {"gguf_bytes": gguf_path.stat().st_size, **_export(name, config, artifacts, limit)}
        artifact = artifacts / name / "int4"
        if rec["exit"] == 0:
            manifest = json.loads((artifact / "manifest.json").read_text())
            rec["artifact_bytes"] = sum(f["size"] for f in manifest["files"].values())
            rec["validation"] = manifest["validation"]["int4"]
        cfg = load_model_configs(config)[name]
        rec.update(_measure(name, cfg, gguf_path, artifact if rec["exit"] == 0 else None, args.reps, args.new_tokens))
        results["sizes"][size] = rec
        _print_size(size, rec)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


def _print_size(size: str, rec: dict) -> None:
    print(f"\n{size} (random weights): GGUF {rec['gguf_bytes'] / 1e6:.0f} MB, export {rec['export_s']} s, "
          f"peak export RSS {rec['export_peak_rss_mb'] / 1024:.1f} GB, exit {rec['exit']}"
          + (f" ({rec['stopped']})" if rec.get("stopped") else ""))
    if "artifact_bytes" in rec:
        print(f"  artifact {rec['artifact_bytes'] / 1e6:.0f} MB = {rec['artifact_bytes'] / rec['gguf_bytes']:.2f}x "
              f"the GGUF")
    engines = rec.get("engines", {})
    tta, llama = engines.get("tta-int4"), engines.get("llama.cpp")
    print(f"  prompt {rec.get('prompt_tokens')} tokens")
    print(_row("tta int4", tta))
    print(_row("llama.cpp", llama))
    if tta and llama:
        def rss(e):
            return e.get("memory", {}).get("model_rss_mb")

        ratio = f"{rss(tta) / rss(llama):.2f}x" if rss(tta) and rss(llama) else "n/a"
        print(f"  tta / llama.cpp: decode {_med(tta, 'decode_tok_s') / _med(llama, 'decode_tok_s'):.2f}x, "
              f"TTFT {_med(tta, 'ttft_s') / _med(llama, 'ttft_s'):.2f}x, model RSS {ratio}")
    for sk in rec.get("skipped", []):
        print(f"  skipped {sk['engine']}: {sk['reason']}")


if __name__ == "__main__":
    sys.exit(main())
