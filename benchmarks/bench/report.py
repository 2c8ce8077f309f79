"""Output: the machine description, results.md / results.json / plots, and the console tables."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .prepare import cpu_flags


def machine_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "machine": platform.machine()}
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu"] = cpu
    try:
        import psutil

        info.update(physical_cores=psutil.cpu_count(logical=False), logical_cores=psutil.cpu_count(),
                    ram_gb=round(psutil.virtual_memory().total / 2**30, 1))
    except ImportError:
        info["logical_cores"] = os.cpu_count()
    flags = cpu_flags()
    info["isa"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "neon") if f in flags]
    versions = {}
    for pkg in ("tta-engine", "onnxruntime", "onnx", "torch", "transformers", "optimum", "optimum-onnx",
                "sentence-transformers", "numpy", "llama_cpp_python", "onnxruntime-genai", "bitsandbytes"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    info["versions"] = versions
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def _fmt(v, spec: str = ".1f", scale: float = 1.0) -> str:
    if v is None:
        return "–"
    if isinstance(v, dict):
        v = v.get("median")
        if v is None:
            return "–"
    return format(v * scale, spec)


def _mb(b) -> str:
    if not b:
        return "–"
    return f"{b / 1e6:.0f}" if b >= 1e7 else f"{b / 1e6:.2f}"


def _target_value(row: dict[str, Any]) -> str:
    return f"{row['value']:.4f}" if "cosine" in row["name"] else f"{row['value']:.2f}"


def _method_text() -> str:
    """The "Method" part of the package docstring (it states the method once, for readers and reports)."""
    from . import __doc__ as package_doc

    return package_doc.split("Method (the same for every engine):", 1)[-1].strip()


def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    s = results["settings"]
    lines = ["# tta-engine benchmark", ""]
    lines.append(f"Machine: **{m.get('cpu')}**, {m.get('physical_cores')} physical / {m.get('logical_cores')} "
                 f"logical cores, {m.get('ram_gb')} GB RAM, ISA {', '.join(m.get('isa', [])) or '?'}; "
                 f"{m.get('platform')}, Python {m.get('python')}.")
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()) + ".")
    lines.append(f"Settings: {'quick' if results.get('quick') else 'full'}; {s['new_tokens']} new tokens, greedy, "
                 f"min_new_tokens = max_new_tokens; {s['reps']} alternating repetitions after a warm-up; medians. "
                 f"Memory: {results.get('rss_note')}")
    lines.append(f"Generated {results.get('created')} in {results.get('elapsed_s', 0):.0f} s.")
    lines.append("")
    for name, r in results["models"].items():
        if r.get("targets"):
            lines += [f"## {name}: the issue's figures", "", "| figure | measured | target | met |", "|---|---:|---:|:---:|"]
            for t in r["targets"]:
                val = "–" if t["value"] is None else _target_value(t)
                met = "–" if t["ok"] is None else ("yes" if t["ok"] else "**no**")
                lines.append(f"| {t['name']} | {val} | {t['target'] or '(info)'} | {met} |")
            lines.append("")
        if r["kind"] == "causal_lm":
            lines += [f"## {name}: decode (prompt {r.get('prompt_tokens')} tokens, {s['new_tokens']} new tokens, batch 1)", "",
                      "| engine | decode tok/s | TTFT ms | prefill tok/s | size MB | cold start s | peak RSS MB | model RSS MB | top-1 vs fp32 PyTorch | KL | greedy = PyTorch |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for e in r["engines"].values():
                mem, fid = e.get("memory", {}), e.get("fidelity", {})
                rss_model = mem.get("model_rss_mb", mem.get("rss_delta_mb"))
                lines.append(
                    f"| {e['label']} | {_fmt(e['decode_tok_s'])} | {_fmt(e['ttft_s'], '.0f', 1000)} | "
                    f"{_fmt(e['prefill_tok_s'], '.0f')} | {_mb(mem.get('size_bytes'))} | {_fmt(mem.get('load_s'), '.2f')} | "
                    f"{_fmt(mem.get('peak_rss_mb'), '.0f')} | {_fmt(rss_model, '.0f')} | "
                    f"{_fmt(fid.get('top1_agreement'), '.4f')} | {_fmt(fid.get('mean_kl_divergence'), '.3g')} | "
                    f"{_fmt(e.get('greedy_match_vs_torch'), '.2f')} |")
            lines.append("")
            ctx = r.get("context") or {}
            lengths = sorted({int(L) for v in ctx.values() for L in v})
            if lengths:
                lines += [f"### {name}: tok/s vs context length (decode / prefill, {s['context_new_tokens']} new tokens)", "",
                          "| engine | " + " | ".join(str(L) for L in lengths) + " |",
                          "|---|" + "---:|" * len(lengths)]
                for key, v in ctx.items():
                    cells = [f"{_fmt(v[str(L)]['decode_tok_s'])} / {_fmt(v[str(L)]['prefill_tok_s'], '.0f')}"
                             if str(L) in v else "–" for L in lengths]
                    lines.append(f"| {r['engines'].get(key, {}).get('label', key)} | " + " | ".join(cells) + " |")
                lines.append("")
            conc = r.get("concurrency") or {}
            lines.append(f"### {name}: concurrent streams")
            lines.append("")
            if conc.get("skipped"):
                lines += [f"Skipped: {conc['skipped']}", ""]
            elif conc.get("streams"):
                lines += [f"{conc['engine']}, {conc['new_tokens']} new tokens per stream.", "",
                          "| streams | aggregate tok/s | per-stream decode tok/s | mean TTFT ms |", "|---:|---:|---:|---:|"]
                for n, v in conc["streams"].items():
                    lines.append(f"| {n} | {v['aggregate_tok_s']:.1f} | {_fmt(v['per_stream_decode_tok_s'])} | "
                                 f"{v['mean_ttft_s'] * 1000:.0f} |")
                lines.append("")
            ov = r.get("manager_overhead") or {}
            if ov.get("skipped"):
                lines += [f"Manager overhead: skipped ({ov['skipped']}).", ""]
            elif ov:
                lines += [f"Manager overhead (one {ov['new_tokens']}-token request, prefix cache off): "
                          f"{ov['overhead_ms_per_request']:+.1f} ms per request, TTFT {ov['ttft_overhead_ms']:+.1f} ms, "
                          f"decode tok/s ratio manager/direct {ov['decode_ratio']:.3f}.", ""]
        else:
            lines += [f"## {name}: embeddings ({r.get('sentences')} sentences, batch {s['emb_batch_size']})", "",
                      "| engine | sentences/s | single query ms | min cosine vs ST | mean cosine | size MB | cold start s | peak RSS MB | model RSS MB |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for e in r["engines"].values():
                mem = e.get("memory", {})
                lines.append(
                    f"| {e['label']} | {_fmt(e['sentences_s'])} | {_fmt(e['single_query_s'], '.2f', 1000)} | "
                    f"{_fmt(e.get('min_cosine'), '.6f')} | {_fmt(e.get('mean_cosine'), '.6f')} | {_mb(mem.get('size_bytes'))} | "
                    f"{_fmt(mem.get('load_s'), '.2f')} | {_fmt(mem.get('peak_rss_mb'), '.0f')} | "
                    f"{_fmt(mem.get('model_rss_mb', mem.get('rss_delta_mb')), '.0f')} |")
            lines.append("")
    if results.get("skipped"):
        lines += ["## Skipped engines", ""]
        lines += [f"- {sk['model']} / {sk['engine']}: {sk['reason']}" for sk in results["skipped"]]
        lines.append("")
    lines += ["## Method", "", _method_text(), ""]
    return "\n".join(lines)


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """context.png (decode and prefill tok/s vs context length) and concurrency.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    lms = {n: r for n, r in results["models"].items() if r["kind"] == "causal_lm"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    any_line = False
    ticks: set[int] = set()
    for name, r in lms.items():
        for key, v in (r.get("context") or {}).items():
            lengths = sorted(int(L) for L in v)
            if not lengths:
                continue
            any_line = True
            ticks.update(lengths)
            label = f"{r['engines'].get(key, {}).get('label', key)}" + (f" ({name})" if len(lms) > 1 else "")
            axes[0].plot(lengths, [v[str(L)]["decode_tok_s"] for L in lengths], marker="o", label=label)
            axes[1].plot(lengths, [v[str(L)]["prefill_tok_s"] for L in lengths], marker="o", label=label)
    for ax, title in zip(axes, ("decode tok/s vs context length", "prefill tok/s vs context length"), strict=True):
        _log2_axes(ax, title, "prompt tokens", sorted(ticks))
    if any_line:
        axes[1].legend(fontsize=7, loc="upper right")
    else:
        axes[0].text(0.5, 0.5, "not measured", ha="center", transform=axes[0].transAxes)
    paths.append(_save(plt, fig, out_dir / "context.png"))

    fig, ax = plt.subplots(figsize=(6, 4.2))
    notes = []
    for name, r in lms.items():
        conc = r.get("concurrency") or {}
        if conc.get("streams"):
            ns = sorted(int(n) for n in conc["streams"])
            ax.plot(ns, [conc["streams"][str(n)]["aggregate_tok_s"] for n in ns], marker="o",
                    label=f"{name}: aggregate")
            ax.plot(ns, [conc["streams"][str(n)]["per_stream_decode_tok_s"] or 0 for n in ns], marker="x",
                    linestyle="--", label=f"{name}: per stream")
        elif conc.get("skipped"):
            notes.append(f"{name}: skipped")
    counts = sorted({int(n) for r in lms.values() for n in ((r.get("concurrency") or {}).get("streams") or {})})
    _log2_axes(ax, "tok/s vs concurrent streams (model manager)", "concurrent streams", counts)
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "\n".join(notes) or "not measured", ha="center", transform=ax.transAxes)
    paths.append(_save(plt, fig, out_dir / "concurrency.png"))
    return paths


def _log2_axes(ax, title: str, xlabel: str, ticks: Sequence[int]) -> None:
    """Title, labels, a log2 x axis with ``ticks`` labelled, and a light grid."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens/s")
    ax.set_xscale("log", base=2)
    if ticks:
        ax.set_xticks(ticks, labels=[str(t) for t in ticks])
    ax.grid(True, alpha=0.3)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "results.json"
    js.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = out_dir / "results.md"
    md.write_text(render_markdown(results))
    plots = write_plots(results, out_dir)
    return {"json": js, "md": md, "plots": plots}


def print_targets(rows: Sequence[dict[str, Any]], out=None) -> None:
    out = out or sys.stdout
    for t in rows:
        val = "not measured" if t["value"] is None else _target_value(t)
        met = "" if t["ok"] is None else ("  OK" if t["ok"] else "  MISSED")
        tgt = f"  (target {t['target']})" if t["target"] else ""
        print(f"  {t['name']:58} {val:>12}{tgt}{met}", file=out)


def print_decode_table(rec: dict[str, Any], out=None) -> None:
    out = out or sys.stdout
    print(f"{'engine':34} {'decode tok/s':>12} {'TTFT ms':>9} {'prefill tok/s':>13} {'size MB':>8} "
          f"{'load s':>7} {'top-1':>7} {'KL':>9}", file=out)
    for e in rec["engines"].values():
        mem, fid = e.get("memory", {}), e.get("fidelity", {})
        print(f"{e['label']:34} {_fmt(e['decode_tok_s']):>12} {_fmt(e['ttft_s'], '.0f', 1000):>9} "
              f"{_fmt(e['prefill_tok_s'], '.0f'):>13} {_mb(mem.get('size_bytes')):>8} {_fmt(mem.get('load_s'), '.2f'):>7} "
              f"{_fmt(fid.get('top1_agreement'), '.4f'):>7} {_fmt(fid.get('mean_kl_divergence'), '.3g'):>9}", file=out)


def print_embed_table(rec: dict[str, Any], out=None) -> None:
    out = out or sys.stdout
    print(f"{'engine':34} {'sentences/s':>11} {'1 query ms':>10} {'min cos':>9} {'mean cos':>9} {'size MB':>8}", file=out)
    for e in rec["engines"].values():
        print(f"{e['label']:34} {_fmt(e['sentences_s']):>11} {_fmt(e['single_query_s'], '.2f', 1000):>10} "
              f"{_fmt(e.get('min_cosine'), '.6f'):>9} {_fmt(e.get('mean_cosine'), '.6f'):>9} "
              f"{_mb(e.get('memory', {}).get('size_bytes')):>8}", file=out)


def write_comparison(rec: dict[str, Any], settings, model: str, out_dir: Path, file_name: str) -> Path:
    """The end of benchmarks/compare_*.py: print the ratios and the skip lines, and write ``out_dir/file_name``
    (the record with the machine and the settings, as JSON)."""
    print("\nratios:")
    print_targets(rec["targets"])
    for sk in rec["skipped"]:
        print(f"skipped {sk['engine']}: {sk['reason']}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / file_name
    path.write_text(json.dumps({"machine": machine_info(), "settings": dataclasses.asdict(settings), "model": model,
                                **rec}, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path
