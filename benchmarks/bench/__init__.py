"""Benchmarks: tta-engine against the other ways of running the same weights on this machine.

The library behind ``tta-engine bench`` and ``benchmarks/compare_decode.py`` / ``compare_embed.py``.

Modules: ``settings`` (BenchSettings), ``prompts`` (texts), ``engines`` (the engine adapters),
``prepare`` (the baselines' cached files), ``specs`` (which engines, and loading them), ``measure``
(timing, medians, ratios), ``memory`` (RSS and cold start), ``fidelity``, ``concurrency`` (through the
model manager), ``targets`` (the issue's figures), ``report`` (markdown, JSON, plots, tables), ``runner``
(``compare_decode``, ``compare_embed``, ``run_bench``) and ``cli``. Nothing beyond the standard library is
imported until a benchmark runs.

Method (the same for every engine):
- one process, the same weights, the same prompt token ids, greedy decoding with ``min_new_tokens`` =
  ``max_new_tokens`` so that EOS never ends a run early;
- each engine is warmed up once, then the engines run in alternating order (forward on even
  repetitions, reversed on odd ones) with a short pause between runs; figures are medians;
- time to first token (TTFT) = from the call to the moment the first token is sampled (prefill + first
  token, tokenization excluded); decode tok/s = (n - 1) / (time of the last token - time of the first);
  prefill tok/s = prompt tokens / TTFT;
- peak RSS: by default each engine is loaded in a fresh subprocess (``python -m bench
  --probe``) which imports numpy, onnxruntime, torch and transformers, loads the engine and generates 16
  tokens (or embeds 32 sentences); ``peak_rss_mb`` is that process's peak RSS (VmHWM), ``model_rss_mb`` the
  peak minus the RSS after the imports; the load time measured there is the cold
  start (files in the OS page cache, so this is a warm-disk cold start). Quick mode measures instead an
  in-process RSS delta around loading (``rss_method = "delta"``), cheaper and rougher.

Optional engines (llama-cpp-python on the GGUF file, onnxruntime-genai, Transformers + bitsandbytes)
are measured when importable and working; otherwise they are listed as skipped with the install command.
"""

from .cli import add_bench_parser, cmd_bench
from .engines import (
    OPTIONAL_ENGINES,
    EmbEngine,
    EngineUnavailable,
    LMEngine,
    RunSample,
    make_emb_engine,
    make_lm_engine,
)
from .fidelity import common_prefix_fraction, fidelity_from_logits
from .measure import (
    interleaved_halves,
    measure_context,
    measure_decode,
    measure_embed,
    median,
    ratio,
    summarize,
)
from .prompts import SINGLE_QUERY, bench_messages, chat_prompt_ids, embedding_corpus
from .report import (
    machine_info,
    print_decode_table,
    print_embed_table,
    print_targets,
    render_markdown,
    write_comparison,
    write_results,
)
from .runner import compare_decode, compare_embed, run_bench
from .settings import DEFAULT_MODELS, BenchSettings
from .specs import lm_engine_specs, load_engines, optional_available
from .targets import TARGETS, Target, target_ratios

__all__ = [
    "DEFAULT_MODELS", "OPTIONAL_ENGINES", "SINGLE_QUERY", "TARGETS", "BenchSettings", "EmbEngine",
    "EngineUnavailable", "LMEngine", "RunSample", "Target", "add_bench_parser", "bench_messages",
    "chat_prompt_ids", "cmd_bench", "common_prefix_fraction", "compare_decode", "compare_embed",
    "embedding_corpus", "fidelity_from_logits", "interleaved_halves", "lm_engine_specs", "load_engines",
    "machine_info", "make_emb_engine", "make_lm_engine", "measure_context", "measure_decode", "measure_embed",
    "median", "optional_available", "print_decode_table", "print_embed_table", "print_targets", "ratio",
    "render_markdown", "run_bench", "summarize", "target_ratios", "write_comparison", "write_results",
]
