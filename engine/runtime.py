"""Loaded models with the public generation / embedding API, on either backend.

``LanguageModel`` wraps a decoder backend (ONNX Runtime artifact or PyTorch fallback), its tokenizer
(with the model's own chat template) and default sampling settings, and offers:
``generate`` (-> Completion), ``stream`` (sync iterator of text deltas), ``agenerate`` / ``astream``
(async, through the model's batch scheduler: the one async path), and ``generate_streaming`` (the
design note's callback form).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifact import Artifact, artifact_dir, artifact_present, export_command, load_artifact
from .config import ModelConfig
from .errors import ArtifactError, ConfigError, InvalidInputError, ModelUnloadedError
from .generator import Completion, GenerationState, generate, generate_events
from .inputs import check_prompt, check_prompt_size
from .sampling import SamplingParams, params_from_kwargs

if TYPE_CHECKING:
    from .tool_calls import ToolSet

log = logging.getLogger(__name__)
Messages = Sequence[dict[str, str]]


class LanguageModel:
    """A causal LM ready to generate. Thread-safe for concurrent requests (each has its own KV cache)."""

    def __init__(self, name: str, backend, tokenizer, eos_ids: Sequence[int], defaults: SamplingParams,
                 *, kind: str, size_bytes: int = 0, device: str = "cpu"):
        self.name, self.backend, self.tokenizer = name, backend, tokenizer
        self.device = device  # the resolved device: "cpu" or "cuda:N"
        self.eos_ids = list(eos_ids)
        self.defaults = defaults
        self.kind = kind  # "onnx" | "torch"
        self.size_bytes = size_bytes
        self._scheduler = None  # started on first async use (see ``scheduler``)
        self._lock = threading.Lock()
        self._closed = False
        self._token_chars: int | None = None

    # -- prompts ------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Messages, tools: ToolSet | None = None) -> list[int]:
        """A string is used as raw text; a list of messages is rendered with the model's chat template
        (with ``tools`` in it: into the template's tools section where it has one, else as a system hint;
        engine/tool_calls.py). Invalid prompts raise InvalidInputError / EmptyInputError (engine/inputs.py)."""
        prompt = check_prompt(prompt)
        template_tools = None
        if tools is not None:
            if isinstance(prompt, str):
                raise InvalidInputError("tools need a chat prompt (a list of messages), not raw text; pass "
                                        "messages or leave tools out")
            from .chat_template import uses_tools

            prompt, template_tools = tools.messages(prompt, uses_tools(self.tokenizer.chat_template))
        check_prompt_size(prompt, self.backend.context_length, self._max_token_chars())
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tools=template_tools)

    @staticmethod
    def _constraint(response_format: Any, tools: ToolSet | None) -> Any:
        """The request's constraint: ``response_format``, or the tools' call grammar."""
        if tools is None:
            return response_format
        if response_format is not None:
            raise InvalidInputError("give tools or response_format, not both (a ToolSet's final= is the "
                                    "structured answer of a request with tools)")
        return tools.response_format()

    def _max_token_chars(self) -> int:
        """Characters of the longest vocabulary entry (0: unknown, no size check before tokenizing)."""
        if self._token_chars is None:
            vocab = getattr(self.tokenizer, "get_vocab", None)
            self._token_chars = max(map(len, vocab()), default=0) if vocab is not None else 0
        return self._token_chars

    def params(self, **kwargs: Any) -> SamplingParams:
        return params_from_kwargs(self.defaults, **kwargs)

    # -- sync ---------------------------------------------------------------------------------------
    def events(self, prompt: str | Messages, state: GenerationState | None = None, response_format: Any = None,
               tools: ToolSet | None = None, **kwargs) -> Iterator[str]:
        """Text deltas; ``response_format`` constrains the output (engine/structured.py); ``tools`` offers
        tools (engine/tool_calls.py: the reply is prose and/or calls in the tool-call format)."""
        ids = self.encode_prompt(prompt, tools)
        params = self.params(**kwargs)
        return generate_events(self.backend, self.tokenizer, ids, params, self.eos_ids,
                               state=state if state is not None else GenerationState(len(ids)),
                               grammar=self._grammar(self._constraint(response_format, tools)))

    def _grammar(self, response_format: Any):
        if response_format is None:
            return None
        from .structured import compile_for_model

        return compile_for_model(self, response_format)

    def generate(self, prompt: str | Messages, response_format: Any = None, tools: ToolSet | None = None,
                 **kwargs) -> Completion:
        return generate(self.backend, self.tokenizer, self.encode_prompt(prompt, tools), self.params(**kwargs),
                        self.eos_ids, grammar=self._grammar(self._constraint(response_format, tools)))

    def stream(self, prompt: str | Messages, **kwargs) -> Iterator[str]:
        """Text deltas; ``close()`` the iterator (or break out of a for loop) to stop decoding."""
        return self.events(prompt, **kwargs)

    # -- async --------------------------------------------------------------------------------------
    @property
    def scheduler(self):
        """The model's batch scheduler (engine/scheduler.py), started with default settings on first
        async use; the manager starts it with its own settings (``start_scheduler``)."""
        with self._lock:
            if self._scheduler is None:
                self._scheduler = self._new_scheduler()
            return self._scheduler

    def start_scheduler(self, **options: Any):
        """Start the scheduler with ``options`` (max_batch, max_queue, prefix_cache_entries, ...)."""
        with self._lock:
            if self._scheduler is not None:
                raise ConfigError(f"the scheduler of {self.name!r} is already running: start_scheduler(...) "
                                  "must come before the model's first async request")
            self._scheduler = self._new_scheduler(**options)
            return self._scheduler

    def _new_scheduler(self, **options: Any):
        from .scheduler import BatchScheduler

        if self._closed:
            raise ModelUnloadedError(f"model {self.name!r} is closed; load it again")
        return BatchScheduler(self, **options)

    async def astream(self, prompt: str | Messages, state: GenerationState | None = None, response_format: Any = None,
                      *, tools: ToolSet | None = None, on_submit: Callable | None = None, on_end: Callable | None = None,
                      **kwargs) -> AsyncIterator[str]:
        """Async iterator of text deltas, decoded by the model's scheduler (batched with every other
        async request to this model). Closing the iterator or cancelling its task stops the request at
        the next decode step. ``on_submit`` / ``on_end``: see ``scheduler.stream_request``."""
        from .scheduler import stream_request
        from .structured import acompile_for_model

        # rendering and tokenizing a long prompt takes milliseconds to seconds: not on the event loop,
        # where it would stall every other stream (the server's SSE responses among them)
        ids = await asyncio.to_thread(self.encode_prompt, prompt, tools)
        params = self.params(**kwargs)
        grammar = await acompile_for_model(self, self._constraint(response_format, tools))
        st = state if state is not None else GenerationState(len(ids))
        async for delta in stream_request(self.scheduler, ids, params, st, grammar,
                                          on_submit=on_submit, on_end=on_end):
            yield delta

    async def agenerate(self, prompt: str | Messages, **kwargs) -> Completion:
        state = GenerationState(0)
        async for _ in self.astream(prompt, state=state, **kwargs):
            pass
        return state.completion()

    async def generate_streaming(self, prompt: str | Messages, callback: Callable[[str], Any] | None,
                                 **kwargs) -> str:
        """The design note's form: ``callback(delta)`` for each delta (sync or async); returns the text."""
        return await deliver_to_callback(self.astream(prompt, **kwargs), callback)

    def close(self) -> None:
        """Stop the scheduler (its queued and active requests fail with ModelUnloadedError), then free
        the backend. Idempotent."""
        with self._lock:
            sched, self._scheduler, self._closed = self._scheduler, None, True
        if sched is not None:
            sched.close()
        if hasattr(self.backend, "close"):
            self.backend.close()


async def deliver_to_callback(deltas: AsyncIterator[str], callback: Callable[[str], Any] | None) -> str:
    """Call ``callback(delta)`` (awaiting it if it is async) for each delta; return the whole text."""
    parts = []
    async for delta in deltas:
        parts.append(delta)
        if callback is not None:
            res = callback(delta)
            if inspect.isawaitable(res):
                await res
    return "".join(parts)


def _defaults(cfg: ModelConfig | None) -> SamplingParams:
    if cfg is None:
        return SamplingParams()
    return SamplingParams(max_new_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty)


def open_artifact_lm(artifact: Artifact, cfg: ModelConfig | None = None, *, threads: int | None = None,
                     device: str | None = None, cuda_graph: bool = False) -> LanguageModel:
    """``cuda_graph``: decode steps replayed as CUDA graphs on a GPU (see OrtDecoder; off by default)."""
    from .ort_decoder import OrtDecoder
    from .tokenizer import Tokenizer

    if artifact.kind != "causal_lm":
        raise ArtifactError(f"{artifact.path} holds a {artifact.kind!r} model, not a causal LM")
    meta = dict(artifact.manifest["decoder"])
    if cfg is not None and not cfg.prefill_graph:
        meta.pop("prefill", None)  # prompts on the decode graph: less memory, slower prompts
    device = device or (cfg.device if cfg is not None else "auto")
    backend = OrtDecoder(artifact.file("model.onnx"), meta, threads=threads, device=device, cuda_graph=cuda_graph)
    tokenizer = Tokenizer.from_artifact(artifact.path, artifact.manifest.get("tokenizer"))
    return LanguageModel(artifact.name, backend, tokenizer, meta["eos_token_ids"], _defaults(cfg), kind="onnx",
                         size_bytes=artifact.size_bytes, device=str(backend.device))


def open_torch_lm(cfg: ModelConfig, *, cache_dir: str | None = None, device: str | None = None) -> LanguageModel:
    """The PyTorch fallback on the resolved device (see sources.load_torch_causal_lm for dtypes)."""
    from .extras import require_extra
    from .sources import eos_token_ids, load_tokenizer, load_torch_causal_lm, resolve_source

    require_extra("torch", f"the PyTorch fallback of {cfg.name} (no compiled artifact; `tta-engine export "
                           f"{cfg.name}` or `tta-engine install-artifact FILE` makes one)")
    from .device import resolve_device
    from .tokenizer import Tokenizer
    from .torch_backend import TorchDecoder

    dev = resolve_device(device or cfg.device, "torch")
    resolved = resolve_source(cfg, cache_dir)
    hf_tokenizer = load_tokenizer(cfg, resolved)
    quant = cfg.quantization
    if quant and cfg.backend != "torch" and importlib.util.find_spec("bitsandbytes") is None:
        log.warning("%s asks for %s quantization but bitsandbytes is not installed: the PyTorch fallback "
                    "runs in fp32 (`pip install 'tta-engine[quant]'` to quantize it)", cfg.name, quant)
        quant = None
    model = load_torch_causal_lm(cfg, resolved, quantization=quant, device=dev)
    context = min(int(getattr(model.config, "max_position_embeddings", 2048)), cfg.context_length or 1 << 30)
    backend = TorchDecoder(model, context)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return LanguageModel(cfg.name, backend, Tokenizer.from_transformers(hf_tokenizer),
                         eos_token_ids(model, hf_tokenizer), _defaults(cfg),
                         kind="torch", size_bytes=size, device=str(dev))


def open_language_model(cfg: ModelConfig, *, artifacts_root: str | Path | None = None, backend: str | None = None,
                        cache_dir: str | None = None, threads: int | None = None,
                        device: str | None = None, cuda_graph: bool = False) -> LanguageModel:
    """The compiled artifact; with backend "auto" and no artifact published, the PyTorch fallback.
    ``device`` (default: the config's) is resolved by engine/device.py for the backend that opens;
    ``cuda_graph`` applies to an artifact on a GPU (see OrtDecoder).

    Nothing is exported here (the manager's ``export_on_demand`` and the CLI's ``--export`` do that):
    a damaged artifact raises ArtifactCorruptedError, and a missing one, when PyTorch cannot stand in,
    ArtifactMissingError naming the export command."""
    device = device or cfg.device
    path = artifact_dir(artifacts_root, cfg.name, cfg.precision)
    if use_artifact(path, backend or cfg.backend):
        return open_artifact_lm(load_artifact(path), cfg, threads=threads, device=device, cuda_graph=cuda_graph)
    return open_torch_lm(cfg, cache_dir=cache_dir, device=device)


def use_artifact(path: Path, backend: str) -> bool:
    """Whether to open the artifact at ``path`` (else PyTorch): always for "onnx", never for "torch";
    for "auto" when anything is published there (so a damaged artifact is an error, not a silent
    fallback) or when PyTorch is not installed (then the error names the export command)."""
    if backend == "torch":
        return False
    if backend == "onnx" or artifact_present(path) or importlib.util.find_spec("torch") is None:
        return True
    log.warning("no artifact at %s: using the PyTorch fallback (run `%s` for the compiled runtime)",
                path, export_command(path))
    return False
