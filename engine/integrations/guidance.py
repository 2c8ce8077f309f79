"""Guidance on tta-engine: ``TTAEngine(model_name)`` is a ``guidance.models.Model`` whose logits come from
the engine's loaded model (the manager's ``LanguageModel`` backend: the ONNX artifact, or the PyTorch
fallback), the way guidance's own ``models.Transformers`` / ``models.LlamaCpp`` plug in: an ``Engine``
subclass implementing ``get_logits(token_ids)`` plus a guidance ``Tokenizer`` built from the model's
``tokenizer.json`` (llguidance's tokenizer, which enforces ``gen(regex=...)``, ``select``, ``json`` token by
token), and a chat template derived from the model's own one, so ``system()/user()/assistant()`` blocks
render exactly as the engine's chat prompts do.

KV reuse across a program's successive calls: the engine keeps one single-row KV cache and the token ids
it holds. Each ``get_logits`` reuses the longest common prefix (the cache is truncated to it by setting
its length) and prefills only the rest, so a program that appends text and generates again prefills only
the new tokens. ``engine.stats`` counts prefilled and reused tokens.

    from guidance import gen, select, system, user, assistant
    from tta_engine.integrations.guidance import TTAEngine

    lm = TTAEngine("smollm2-135m-instruct")
    with user():
        lm += "Is the forest calm?"
    with assistant():
        lm += select(["yes", "no"], name="answer")
    print(lm["answer"])
"""

from __future__ import annotations

import operator
import threading
from dataclasses import dataclass
from itertools import takewhile
from typing import Any

import numpy as np

from ..errors import TTAEngineError
from ..structured import ll_tokenizer
from .common import default_manager, require

guidance = require("guidance", "guidance")
llguidance = require("llguidance", "guidance")

from guidance._schema import SamplingParams  # noqa: E402
from guidance.chat import ChatTemplate  # noqa: E402
from guidance.models import Model  # noqa: E402
from guidance.models._engine import Engine, EngineInterpreter, LogitsOutput, Tokenizer  # noqa: E402

__all__ = ["EngineStats", "TTAEngine", "TTAGuidanceEngine", "TTAGuidanceTokenizer", "chat_template_class"]


# -- tokenizer ------------------------------------------------------------------------------------------
def _encode(tokenizer, text: str) -> list[int]:
    out = tokenizer(text)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The model's chat template applied to ``messages``, as text."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def chat_template_class(tokenizer) -> type[ChatTemplate] | None:
    """A guidance ``ChatTemplate`` whose role starts/ends are read off the model's own chat template, by
    rendering sentinel messages (so a role block renders as the engine renders that message)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    a, b = "\x00TTA-A\x00", "\x00TTA-B\x00"
    starts: dict[str, str] = {}
    ends: dict[str, str] = {}
    try:
        one = render_chat(tokenizer, [{"role": "system", "content": a}])
        sys_start, sys_end = one.split(a)
        starts["system"], ends["system"] = sys_start, sys_end
        for role in ("user", "assistant"):
            two = render_chat(tokenizer, [{"role": "system", "content": a}, {"role": role, "content": b}])
            head, rest = two.split(a)
            between, end = rest.split(b)
            if head != sys_start or not between.startswith(sys_end):
                return None
            starts[role], ends[role] = between[len(sys_end):], end
    except Exception:  # a template that rejects such probes (e.g. strict alternation): guidance's ChatML
        return None
    # the system block may carry a BOS text the engine's tokenizer adds itself; keep it: the template does
    template_str = tokenizer.chat_template

    class _ModelChatTemplate(ChatTemplate):
        def get_role_start(self, role_name: str, **kwargs) -> str:
            if role_name not in starts:
                raise TTAEngineError(f"the chat template has no role {role_name!r}; use system, user or assistant")
            return starts[role_name]

        def get_role_end(self, role_name: str | None = None) -> str:
            return ends.get(role_name or "assistant", ends["assistant"])

    _ModelChatTemplate.template_str = template_str
    return _ModelChatTemplate


class TTAGuidanceTokenizer(Tokenizer):
    """guidance's tokenizer interface over the engine's tokenizer (llguidance reads tokenizer.json)."""

    def __init__(self, tokenizer, eos_token_id: int, chat_template=None):
        # the structured-output bridge: the same llguidance tokenizer the engine's own constraints use
        # (it repairs GGUF-converted byte-level decoders, which llguidance would read literally)
        ll = ll_tokenizer(tokenizer, 0, int(eos_token_id))
        # BOS only where the engine's tokenizer adds one itself (SmolLM2's does not), so that guidance
        # prompts encode like the engine's
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None and getattr(tokenizer, "special_tokens", None):  # the engine's tokenizers-based one
            bos = tokenizer.token_to_id(tokenizer.special_tokens.get("bos_token") or "")
        if bos is not None and _encode(tokenizer, "a")[:1] != [bos]:
            bos = None
        if chat_template is None:
            chat_template = chat_template_class(tokenizer)
        super().__init__(ll_tokenizer=ll, chat_template=chat_template, bos_token_id=bos)
        self._vocab_size = ll.vocab_size


# -- engine ---------------------------------------------------------------------------------------------
@dataclass
class EngineStats:
    calls: int = 0  # get_logits calls
    forward_passes: int = 0
    prefilled_tokens: int = 0  # tokens run through the model
    reused_tokens: int = 0  # tokens served from the KV cache
    cache_resets: int = 0  # times the cache could not be truncated and was rebuilt


class TTAGuidanceEngine(Engine):
    """A guidance Engine over a loaded tta-engine ``LanguageModel``: one single-row KV cache reused across
    calls (longest common token prefix; the rest is prefilled).

    With ``manager``, every forward pass holds the model in the manager (``manager.hold``), so LRU
    eviction cannot close its session mid-call; a model evicted between calls is loaded again and the
    cache rebuilt on it."""

    def __init__(self, lm, *, manager=None, chat_template=None, enable_backtrack: bool = True,
                 enable_ff_tokens: bool = True, enable_monitoring: bool = False, **kwargs):
        self.manager = manager
        self.lm = lm
        self.backend = lm.backend
        self.model = lm.name
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._cache = None
        self._cached_ids: list[int] = []  # the tokens whose KV the cache holds (may run past its length)
        self._logits_ids: list[int] = []  # the request ``_cached_logits`` answer
        self._cached_logits: np.ndarray | None = None
        eos = lm.eos_ids[0] if lm.eos_ids else getattr(lm.tokenizer, "eos_token_id", None)
        if eos is None:
            raise TTAEngineError(f"{lm.name}: no EOS token id; guidance needs one to end generations")
        super().__init__(TTAGuidanceTokenizer(lm.tokenizer, eos, chat_template), enable_backtrack=enable_backtrack,
                         enable_ff_tokens=enable_ff_tokens, enable_monitoring=enable_monitoring,
                         enable_token_probabilities=False, enable_top_k=False, **kwargs)

    # the KV cache ------------------------------------------------------------------------------------
    @property
    def _tail_survives(self) -> bool:
        """Whether positions past the cache's length keep their KV (a fused cache only sets its length)."""
        from ..ort_decoder import FusedKVCache

        return isinstance(self._cache, FusedKVCache)

    def _truncate(self, n: int) -> int:
        """Keep the first ``n`` cached positions; return how many are kept (0 when the cache had to be
        rebuilt)."""
        cache = self._cache
        if cache is None:
            return 0
        if n == int(cache.lengths[0]):
            return n
        from ..ort_decoder import FusedKVCache, OptimumKVCache

        past = getattr(cache, "past", None)
        if isinstance(cache, FusedKVCache):  # in place: the next step writes from position n on
            pass
        elif hasattr(past, "crop"):  # PyTorch DynamicCache
            past.crop(n)
        elif isinstance(cache, OptimumKVCache):  # ORT-owned past values, sliced
            import onnxruntime as ort

            cache.past = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :n]))
                          for k, v in past.items()}
        else:
            self._reset()
            return 0
        cache.lengths = np.array([n], dtype=np.int64)
        return n

    def _reset(self) -> None:
        if self._cache is not None:
            self._cache.close()
        self._cache = self.backend.new_cache(1, capacity=256)
        self._cached_ids, self._logits_ids, self._cached_logits = [], [], None
        self.stats.cache_resets += 1

    def get_logits(self, token_ids: list[int], include_all_uncached_tokens: bool = False) -> LogitsOutput:
        """Logits [1, vocab] for the next token after ``token_ids`` (the last position only: the fused graph
        emits no others, so guidance's token probabilities are off for this engine)."""
        if not token_ids:
            raise TTAEngineError("guidance asked for logits of an empty token sequence")
        if self.manager is None:
            return self._logits(token_ids)
        with self.manager.hold(self.model) as lm:
            if lm is not self.lm:  # evicted (its session closed) and loaded again since the last call
                with self._lock:
                    self.lm, self.backend, self._cache = lm, lm.backend, None
                    self._cached_ids, self._logits_ids, self._cached_logits = [], [], None
            return self._logits(token_ids)

    def _logits(self, token_ids: list[int]) -> LogitsOutput:
        with self._lock:
            self.stats.calls += 1
            if self._cache is None:
                self._reset()
            if token_ids == self._logits_ids and self._cached_logits is not None:
                self.stats.reused_tokens += len(token_ids)
                return {"logits": self._cached_logits, "n_tokens": len(token_ids), "n_cached": len(token_ids)}
            num_cached = sum(takewhile(operator.truth, map(operator.eq, token_ids, self._cached_ids)))
            if num_cached == len(token_ids):
                num_cached -= 1  # at least one token must run to produce its logits
            num_cached = self._truncate(num_cached)
            new = token_ids[num_cached:]
            try:
                logits = self.backend.forward(self._cache, np.asarray([new], dtype=np.int64))
            except BaseException:
                self._reset()  # a failed step leaves the cache in an unknown state
                raise
            self.stats.forward_passes += 1
            self.stats.prefilled_tokens += len(new)
            self.stats.reused_tokens += num_cached
            logits = self._fit_vocab(np.asarray(logits, dtype=np.float32).reshape(1, -1))
            # The positions past the request stay in a fused cache's buffer (truncating only sets its
            # length): when the tokens just written equal the ones held there, the rest of the old sequence
            # is still valid and a later call that returns to it (guidance asks for a short prefix, e.g.
            # a role start, before the whole prompt) reuses it instead of prefilling it again.
            old = self._cached_ids
            keep_tail = self._tail_survives and old[num_cached:len(token_ids)] == new
            self._cached_ids = list(token_ids) + (old[len(token_ids):] if keep_tail else [])
            self._logits_ids = list(token_ids)
            self._cached_logits = logits
            return {"logits": logits, "n_tokens": len(token_ids), "n_cached": num_cached}

    def _fit_vocab(self, logits: np.ndarray) -> np.ndarray:
        n = self.tokenizer._vocab_size
        if logits.shape[1] == n:
            return logits
        if logits.shape[1] > n:  # padded embedding rows
            return np.ascontiguousarray(logits[:, :n])
        out = np.full((1, n), -np.inf, dtype=np.float32)
        out[:, : logits.shape[1]] = logits
        return out

    def close(self) -> None:
        with self._lock:
            if self._cache is not None:
                self._cache.close()
            self._cache, self._cached_ids, self._logits_ids, self._cached_logits = None, [], [], None


# -- the guidance model ---------------------------------------------------------------------------------
class TTAEngine(Model):
    """A guidance model backed by tta-engine: ``TTAEngine("smollm2-135m-instruct")``.

    ``manager``: the TransformersModelManager whose loaded model to use (default: the process-wide one
    shared by every integration), so guidance runs on the same weights as the game's other requests.
    ``echo``: guidance's notebook display (off by default: this is a game engine).
    """

    def __init__(self, model_name: str, manager=None, *, echo: bool = False, chat_template=None,
                 sampling_params: SamplingParams | None = None, enable_backtrack: bool = True,
                 enable_ff_tokens: bool = True, enable_monitoring: bool = False):
        manager = manager if manager is not None else default_manager()
        lm, _ = manager.load_model(model_name)
        if not hasattr(lm, "backend"):
            raise TTAEngineError(f"model {model_name!r} is not a causal LM; guidance needs a text generator")
        engine = TTAGuidanceEngine(lm, manager=manager, chat_template=chat_template, enable_backtrack=enable_backtrack,
                                   enable_ff_tokens=enable_ff_tokens, enable_monitoring=enable_monitoring)
        super().__init__(interpreter=EngineInterpreter(engine),
                         sampling_params=SamplingParams() if sampling_params is None else sampling_params,
                         echo=echo)

    @property
    def engine(self) -> TTAGuidanceEngine:
        return self._interpreter.engine


def engine_of(model: Any) -> TTAGuidanceEngine:
    """The TTAGuidanceEngine behind a guidance model built by TTAEngine (or a copy of one)."""
    return model._interpreter.engine
