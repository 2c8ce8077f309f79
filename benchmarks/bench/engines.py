"""The engines compared: tta-engine, Optimum ORT, Transformers PyTorch (also with bitsandbytes),
llama.cpp, onnxruntime-genai, sentence-transformers. Each is built from a JSON-able spec."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Optional engines: name -> (import name, install hint).
OPTIONAL_ENGINES: dict[str, tuple[str, str]] = {
    "llama.cpp": ("llama_cpp", "pip install llama-cpp-python"),
    "onnxruntime-genai": ("onnxruntime_genai", "pip install onnxruntime-genai"),
    "bitsandbytes": ("bitsandbytes", "pip install bitsandbytes  (or pip install 'tta-engine[quant]')"),
}


class EngineUnavailable(Exception):
    """An engine that cannot run here; the message says why and how to add it."""


@dataclass
class RunSample:
    prompt_tokens: int
    ttft_s: float
    decode_tok_s: float
    n_tokens: int
    token_ids: list[int] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else 0.0


def _decode_rate(times: Sequence[float]) -> float:
    if len(times) < 2 or times[-1] <= times[0]:
        return 0.0
    return (len(times) - 1) / (times[-1] - times[0])


def dir_size(path: Path, patterns: Sequence[str] = ("*",)) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    seen, total = set(), 0
    for pat in patterns:
        for p in path.rglob(pat):
            if p.is_file() and p not in seen:
                seen.add(p)
                total += p.stat().st_size
    return total


def _not_installed(package: str, engine: str) -> EngineUnavailable:
    return EngineUnavailable(f"{package} is not installed: {OPTIONAL_ENGINES[engine][1]}")


def _timed_sample(ids: Sequence[int], t0: float, times: Sequence[float], toks: list[int]) -> RunSample:
    """A run from the start time and each new token's arrival time."""
    return RunSample(len(ids), (times[0] - t0) if times else 0.0, _decode_rate(times), len(toks), toks)


class Engine:
    """One way of running a model. Built from a JSON-able ``spec`` (so a subprocess can rebuild it)."""

    family = "?"

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.key: str = spec["key"]
        self.label: str = spec.get("label", self.key)
        self.precision: str = spec.get("precision", "?")
        self.size_bytes = 0

    def load(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LMEngine(Engine):
    """One way of running a causal LM."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__(spec)
        self.context_length: int = int(spec.get("context_length") or 1 << 20)

    def run(self, ids: Sequence[int], new_tokens: int) -> RunSample:
        raise NotImplementedError

    def teacher_forced_logits(self, ids: Sequence[int]):
        """[seq, vocab] logits of every prompt position, or None when the engine cannot give them."""
        return None


class TtaLM(LMEngine):
    """tta-engine's compiled artifact (ONNX Runtime, fused graph), through the public generator."""

    family = "tta-engine"

    def load(self) -> None:
        from tta_engine.artifact import load_artifact
        from tta_engine.runtime import open_artifact_lm

        art = load_artifact(self.spec["path"])  # verifies sha256 hashes, as the runtime does
        self.lm = open_artifact_lm(art, threads=self.spec.get("threads"), device=self.spec.get("device"))
        self.device = self.lm.device
        self.size_bytes = art.size_bytes
        self.context_length = min(self.context_length, int(self.lm.backend.context_length))

    def run(self, ids, new_tokens):
        from tta_engine.generator import GenerationState, generate_events
        from tta_engine.sampling import SamplingParams

        params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.0)
        st = GenerationState(len(ids))
        for _ in generate_events(self.lm.backend, self.lm.tokenizer, list(ids), params, self.lm.eos_ids, state=st):
            pass
        end = time.perf_counter()
        first = st.t_first or end
        n = len(st.tokens)
        return RunSample(len(ids), first - st.t_start, (n - 1) / (end - first) if n > 1 and end > first else 0.0,
                         n, list(st.tokens))

    def close(self):
        self.lm.close()


class _TimingStreamer:
    """A Transformers streamer that only records when each new token arrives."""

    def __init__(self):
        self.calls, self.times = 0, []

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > 1:  # the first call carries the prompt
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFGenerateLM(LMEngine):
    """Engines driven by Transformers' ``generate`` (PyTorch, Optimum ORT, bitsandbytes)."""

    model = None

    def _gen_config(self, new_tokens: int):
        from transformers import GenerationConfig

        eos = self.spec.get("eos_token_ids") or getattr(self.model.generation_config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, list) and eos else eos
        return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                num_beams=1, eos_token_id=eos, pad_token_id=pad)

    def run(self, ids, new_tokens):
        import torch

        x = torch.tensor([list(ids)], dtype=torch.long)
        streamer = _TimingStreamer()
        gc = self._gen_config(new_tokens)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc,
                                      streamer=streamer)
        return _timed_sample(ids, t0, streamer.times, out[0, len(ids):].tolist())

    def teacher_forced_logits(self, ids):
        import torch

        x = torch.tensor([list(ids)], dtype=torch.long)
        with torch.inference_mode():
            out = self.model(input_ids=x, attention_mask=torch.ones_like(x))
        return out.logits[0].float().cpu().numpy()

    def close(self):
        self.model = None


class TorchLM(HFGenerateLM):
    """Transformers + PyTorch (fp32, or bitsandbytes 8/4-bit) from the saved fp32 weights directory."""

    family = "transformers"

    def load(self):
        import torch
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"dtype": torch.float32}
        quant = self.spec.get("quantization")
        if quant:
            if importlib.util.find_spec("bitsandbytes") is None:
                raise _not_installed("bitsandbytes", "bitsandbytes")
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = (BitsAndBytesConfig(load_in_8bit=True) if quant == "8bit" else
                                             BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
            kwargs["device_map"] = "cpu"
        if self.spec.get("threads"):
            torch.set_num_threads(int(self.spec["threads"]))
        self.model = AutoModelForCausalLM.from_pretrained(self.spec["path"], **kwargs).eval()
        self.size_bytes = (int(self.model.get_memory_footprint()) if quant else
                           dir_size(Path(self.spec["path"]), ("*.safetensors", "*.bin")))


class OptimumLM(HFGenerateLM):
    """Optimum's ``ORTModelForCausalLM`` (its own export of the same PyTorch model, optionally int8)."""

    family = "optimum"

    def load(self):
        from optimum.onnxruntime import ORTModelForCausalLM

        kwargs = {}
        if self.spec.get("threads"):
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = int(self.spec["threads"])
            kwargs["session_options"] = so
        self.model = ORTModelForCausalLM.from_pretrained(self.spec["path"], file_name=self.spec["file_name"],
                                                         **kwargs)
        self.size_bytes = dir_size(Path(self.spec["path"]) / self.spec["file_name"]) + sum(
            p.stat().st_size for p in Path(self.spec["path"]).glob(self.spec["file_name"] + "*data"))


class LlamaCppLM(LMEngine):
    """llama-cpp-python on the GGUF file itself (its native quantized kernels)."""

    family = "llama.cpp"

    def load(self):
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise _not_installed("llama-cpp-python", "llama.cpp") from exc
        threads = self.spec.get("threads") or _physical_cores()
        self.llm = Llama(model_path=self.spec["path"], n_ctx=int(self.spec.get("n_ctx", 4096)), n_threads=threads,
                         n_threads_batch=threads, n_batch=512, verbose=False)
        self._scorer = None  # the logits_all context of teacher_forced_logits, made on first use
        self.size_bytes = Path(self.spec["path"]).stat().st_size

    def run(self, ids, new_tokens):
        self.llm.reset()  # no KV reuse across runs: every run prefills the whole prompt
        return self.generate(ids, new_tokens)

    def generate(self, ids, new_tokens: int, *, stop_at_eos: bool = False) -> RunSample:
        """Greedy tokens for ``ids``. llama-cpp-python keeps the KV of the longest common prefix with
        its previous sequence and evaluates only the rest (call ``llm.reset()`` first for a cold run)."""
        times, toks = [], []
        t0 = time.perf_counter()
        for tok in self.llm.generate(list(ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                     reset=True):
            times.append(time.perf_counter())
            toks.append(int(tok))
            if len(toks) >= new_tokens or (stop_at_eos and tok == self.llm.token_eos()):
                break
        return _timed_sample(ids, t0, times, toks)

    def teacher_forced_logits(self, ids):
        """llama.cpp's own logits at every prompt position (``logits_all``), from a second context sized to
        the prompt: ``scores`` is [n_ctx, vocab] float32, 4 GB at n_ctx 4096 for a 262k vocabulary."""
        import numpy as np
        from llama_cpp import Llama

        n_ctx = max(64, 1 << (len(ids) - 1).bit_length())
        if self._scorer is None or self._scorer.n_ctx() < n_ctx:
            threads = self.spec.get("threads") or _physical_cores()
            self._scorer = Llama(model_path=self.spec["path"], n_ctx=n_ctx, n_threads=threads,
                                 n_threads_batch=threads, n_batch=512, logits_all=True, verbose=False)
        self._scorer.reset()
        self._scorer.eval(list(ids))
        return np.array(self._scorer.scores[: len(ids)], dtype=np.float32)

    def close(self):
        self.llm = self._scorer = None


class OrtGenAILM(LMEngine):
    """onnxruntime-genai on a model built by its own builder from the same fp32 weights."""

    family = "onnxruntime-genai"

    def load(self):
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise _not_installed("onnxruntime-genai", "onnxruntime-genai") from exc
        self.og = og
        self.model = og.Model(self.spec["path"])
        self.size_bytes = dir_size(Path(self.spec["path"]), ("*.onnx", "*.onnx.data"))

    def run(self, ids, new_tokens):
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens,
                                  do_sample=False)
        times, toks = [], []
        t0 = time.perf_counter()
        gen = og.Generator(self.model, params)
        gen.append_tokens([list(ids)])
        while not gen.is_done() and len(toks) < new_tokens:
            gen.generate_next_token()
            times.append(time.perf_counter())
            toks.append(int(gen.get_next_tokens()[0]))
        del gen
        return _timed_sample(ids, t0, times, toks)

    def close(self):
        self.model = None


LM_ENGINE_CLASSES: dict[str, type[LMEngine]] = {
    "tta": TtaLM, "torch": TorchLM, "optimum": OptimumLM, "llama.cpp": LlamaCppLM, "ortgenai": OrtGenAILM,
}


def make_lm_engine(spec: dict[str, Any]) -> LMEngine:
    return LM_ENGINE_CLASSES[spec["engine"]](spec)


# -- embedding engines -----------------------------------------------------------------------------

class EmbEngine(Engine):
    """One way of running a sentence-embedding model."""

    def encode(self, texts: list[str], batch_size: int):
        raise NotImplementedError

    def close(self) -> None:
        self.model = None


class TtaEmb(EmbEngine):
    family = "tta-engine"

    def load(self):
        from tta_engine.artifact import load_artifact
        from tta_engine.embeddings import OrtEncoder

        art = load_artifact(self.spec["path"])
        self.model = OrtEncoder(art.path, threads=self.spec.get("threads"), device=self.spec.get("device") or "auto")
        self.device = str(self.model.device)
        self.size_bytes = art.size_bytes

    def encode(self, texts, batch_size):
        return self.model.encode(texts, batch_size=batch_size, normalize=True)


class STEmb(EmbEngine):
    """sentence-transformers itself: PyTorch, or its ONNX backend (Optimum), optionally int8."""

    family = "sentence-transformers"

    def load(self):
        from sentence_transformers import SentenceTransformer

        backend = self.spec.get("backend", "torch")
        kwargs: dict[str, Any] = {"device": "cpu", "backend": backend}
        if self.spec.get("file_name"):
            kwargs["model_kwargs"] = {"file_name": self.spec["file_name"]}
        self.model = SentenceTransformer(self.spec["path"], **kwargs)
        path = Path(self.spec["path"])
        if backend == "onnx":
            self.size_bytes = dir_size(path / (self.spec.get("file_name") or "onnx/model.onnx"))
        else:
            self.size_bytes = dir_size(path, ("*.safetensors", "*.bin"))

    def encode(self, texts, batch_size):
        return self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)


EMB_ENGINE_CLASSES: dict[str, type[EmbEngine]] = {"tta": TtaEmb, "st": STEmb}


def make_emb_engine(spec: dict[str, Any]) -> EmbEngine:
    return EMB_ENGINE_CLASSES[spec["engine"]](spec)


def _physical_cores() -> int:
    from tta_engine.ort_session import physical_cores

    return physical_cores()
