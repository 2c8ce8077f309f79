"""Structured output: constrained decoding with llguidance.

``response_format`` (one parameter on every generation call) is turned into an llguidance grammar and
compiled into an ``LLMatcher`` for the model's tokenizer; at each decode step the matcher's allowed-token
bitmask is applied to the request's logits before sampling and the sampled token is consumed by the
matcher, so the output always parses. Accepted values:

- a Pydantic model class, or a JSON Schema dict;
- OpenAI's ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`` and ``{"type": "json_object"}``
  (``{"type": "text"}`` means no constraint);
- ``{"type": "regex", "pattern": ...}``, ``{"type": "choice", "choices": [...]}``,
  ``{"type": "grammar", "lark": ...}`` (llguidance's Lark dialect, ``%json {...}`` included) or
  ``{"type": "grammar", "gbnf": ...}``.

JSON is generated compactly with Python's separators (``", "`` and ``": "``, no other whitespace) unless
the schema's ``x-guidance`` options say otherwise. The tokenizer bridge builds an ``llguidance.LLTokenizer``
from the ``tokenizer.json`` state of a Hugging Face ``tokenizers.Tokenizer`` (or any object carrying one),
so no Transformers import is needed. Compiled grammars are cached per (tokenizer, grammar); each request
gets a cheap deep copy of the compiled matcher.

Tool calls (``<tool>NAME</tool><parameters>{JSON}</parameters>``) are built on this module in
engine/tool_calls.py.
"""

from __future__ import annotations

import collections
import functools
import json
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BackendUnavailableError, StructuredOutputError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_FORMAT_TYPES = ("json_schema", "json_object", "regex", "choice", "grammar", "text")
_CACHE_SIZE = 64
_TOKENIZER_CACHE_SIZE = 8


def _llguidance():
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - llguidance is a dependency
        raise BackendUnavailableError(
            "structured output needs llguidance: pip install 'tta-engine[structured]'") from exc
    return llguidance


# --- response_format -> llguidance grammar ----------------------------------------------------------------

def _is_pydantic_model(obj: Any) -> bool:
    return isinstance(obj, type) and hasattr(obj, "model_json_schema") and hasattr(obj, "model_validate_json")


@functools.lru_cache(maxsize=256)
def _pydantic_schema(model: type) -> str:
    """The model's JSON Schema; unless the model allows extra fields (``extra="allow"``), its objects admit
    no properties beyond the declared ones (Pydantic would drop them anyway; OpenAI's strict mode does
    the same), so a small model cannot wander off into invented keys."""
    schema = model.model_json_schema()
    if (getattr(model, "model_config", None) or {}).get("extra") != "allow":
        _close_objects(schema)
    return json.dumps(schema)


def _close_objects(node: Any) -> None:
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _close_objects(value)
    elif isinstance(node, list):
        for value in node:
            _close_objects(value)


def _schema_text(schema: Any, where: str) -> str:
    if _is_pydantic_model(schema):
        return _pydantic_schema(schema)
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise StructuredOutputError(f"{where}: the JSON Schema string is not JSON ({exc})") from exc
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, Mapping):
        raise StructuredOutputError(f"{where}: expected a JSON Schema dict or a Pydantic model class, "
                                    f"got {type(schema).__name__}")
    try:
        return json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise StructuredOutputError(f"{where}: the JSON Schema is not JSON-serializable ({exc})") from exc


@functools.lru_cache(maxsize=256)
def _with_json_options(schema_text: str) -> str:
    """The schema with our default JSON layout under its ``x-guidance`` options (the schema's own win)."""
    schema = json.loads(schema_text)
    if isinstance(schema, dict):
        schema["x-guidance"] = {**JSON_OPTIONS, **schema.get("x-guidance", {})}
    return json.dumps(schema)


def _lark_string(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid llguidance Lark string literal


def grammar_of(response_format: Any) -> str | None:
    """The llguidance grammar (serialized) of a ``response_format``; None for "no constraint".

    Raises :class:`StructuredOutputError` for a value of an unknown shape.
    """
    llg = _llguidance()
    rf = response_format
    if rf is None:
        return None
    if _is_pydantic_model(rf):
        return llg.LLMatcher.grammar_from_json_schema(_with_json_options(_pydantic_schema(rf)))
    if not isinstance(rf, Mapping):
        raise StructuredOutputError(
            f"response_format of type {type(rf).__name__} is not supported; pass a Pydantic model class, a JSON "
            "Schema dict, or {'type': 'json_schema'|'json_object'|'regex'|'choice'|'grammar', ...}")
    kind = rf.get("type")
    if kind not in _FORMAT_TYPES:  # a plain JSON Schema ({"type": "object", ...}, {"properties": ...}, ...)
        return llg.LLMatcher.grammar_from_json_schema(_with_json_options(_schema_text(rf, "response_format")))
    if kind == "text":
        return None
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema(_with_json_options('{"type": "object"}'))
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise StructuredOutputError("response_format {'type': 'json_schema'} needs "
                                        "'json_schema': {'name': ..., 'schema': {...}, 'strict': ...}")
        return llg.LLMatcher.grammar_from_json_schema(
            _with_json_options(_schema_text(spec["schema"], "response_format json_schema.schema")))
    if kind == "regex":
        pattern = rf.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise StructuredOutputError("response_format {'type': 'regex'} needs a non-empty 'pattern' string")
        return llg.LLMatcher.grammar_from_regex(pattern)
    if kind == "choice":
        choices = rf.get("choices")
        if (isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise StructuredOutputError("response_format {'type': 'choice'} needs 'choices': a non-empty list of "
                                        "non-empty strings")
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(_lark_string(c) for c in choices))
    # grammar
    if isinstance(rf.get("lark"), str):
        return llg.LLMatcher.grammar_from_lark(rf["lark"])
    if isinstance(rf.get("gbnf"), str):
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            return llg.LLMatcher.grammar_from_lark(any_to_lark(rf["gbnf"]))
        except Exception as exc:  # noqa: BLE001 - the converter raises plain exceptions
            raise StructuredOutputError(f"response_format grammar: the GBNF grammar does not convert ({exc})") from exc
    raise StructuredOutputError("response_format {'type': 'grammar'} needs 'lark': '<Lark grammar>' "
                                "(or 'gbnf': '<GBNF grammar>')")


# --- tokenizer bridge ------------------------------------------------------------------------------------

def _rust_tokenizer(tokenizer: Any):
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` (itself, a Transformers fast tokenizer's backend,
    or the runtime's tokenizers-based wrapper)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    for attr in ("backend_tokenizer", "_backend", "_tokenizer"):
        inner = getattr(tokenizer, attr, None)
        if isinstance(inner, Tokenizer):
            return inner
    raise StructuredOutputError(
        f"structured output needs a Hugging Face fast tokenizer (tokenizer.json); {type(tokenizer).__name__} "
        "has none. Use a model whose tokenizer ships a tokenizer.json.")


_PROBE = 'Hello world, {"id": "x-1", "age": 42}\n  caf\u00e9 \u4f60\u597d \U0001F600'


def _simplify_decoder(state: dict) -> None:
    """Byte-level BPE tokenizers converted from GGUF (Transformers' converter) carry a decoder Sequence
    [ByteFallback, Fuse, Replace, ByteLevel] that llguidance does not recognise as byte-level, so it would
    read 'Ġ' literally; for byte-level vocabularies the ByteLevel decoder alone decodes the same."""
    dec = state.get("decoder") or {}
    if dec.get("type") == "Sequence":
        byte_level = [d for d in dec.get("decoders", []) if d.get("type") == "ByteLevel"]
        pre = state.get("pre_tokenizer") or {}
        pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        if byte_level and any(p.get("type") == "ByteLevel" for p in pres):
            state["decoder"] = byte_level[0]


_tok_lock = threading.Lock()
_tok_cache: collections.OrderedDict[tuple, tuple[Any, Any]] = collections.OrderedDict()


def ll_tokenizer(tokenizer: Any, vocab_size: int, eos_id: int):
    """An ``llguidance.LLTokenizer`` for ``tokenizer`` whose vocabulary is ``vocab_size`` wide (the logits
    width) and whose end token is ``eos_id``. Cached (building one takes tens of milliseconds)."""
    llg = _llguidance()
    key = (id(tokenizer), int(vocab_size), int(eos_id))
    with _tok_lock:
        hit = _tok_cache.get(key)
        if hit is not None and hit[0] is tokenizer:
            _tok_cache.move_to_end(key)
            return hit[1]
    rust = _rust_tokenizer(tokenizer)
    n_vocab = max(int(vocab_size), rust.get_vocab_size(with_added_tokens=True))
    state = json.loads(rust.to_str())
    state["padding"] = state["truncation"] = None
    _simplify_decoder(state)
    try:
        llt = llg.LLTokenizer(json.dumps(state), n_vocab=n_vocab, eos_token=int(eos_id))
    except Exception as exc:  # noqa: BLE001 - llguidance raises ValueError/RuntimeError on odd tokenizers
        raise StructuredOutputError(f"llguidance cannot use this tokenizer for structured output: {exc}") from exc
    probe = rust.encode(_PROBE, add_special_tokens=False).ids
    if llt.decode_str(probe) != rust.decode(probe, skip_special_tokens=False):
        raise StructuredOutputError(
            "llguidance reads this tokenizer's tokens differently from the tokenizer itself "
            f"({llt.decode_str(probe)!r} vs {rust.decode(probe)!r}); structured output is not available for it")
    with _tok_lock:
        _tok_cache[key] = (tokenizer, llt)  # holds the tokenizer, so its id is not reused while cached
        while len(_tok_cache) > _TOKENIZER_CACHE_SIZE:
            _tok_cache.popitem(last=False)
    return llt


# --- compiled grammars and per-request state ---------------------------------------------------------------

@dataclass(frozen=True)
class CompiledGrammar:
    """A grammar compiled for one tokenizer; ``start()`` gives a request its own matcher."""

    matcher: Any  # the compiled LLMatcher in its initial state (never advanced)
    vocab_size: int  # logits width
    eos_ids: tuple[int, ...]
    grammar: str
    ll_vocab_size: int  # the matcher's vocabulary (>= vocab_size when the tokenizer has more tokens)

    def start(self) -> GrammarState:
        return GrammarState(self)


_grammar_lock = threading.Lock()
_grammar_cache: collections.OrderedDict[tuple, CompiledGrammar] = collections.OrderedDict()


def compile_grammar(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int], grammar: str) -> CompiledGrammar:
    """Compile ``grammar`` for ``tokenizer`` (cached); a grammar that does not compile raises
    :class:`StructuredOutputError` naming the problem."""
    llg = _llguidance()
    eos = tuple(int(e) for e in eos_ids)
    if not eos:
        raise StructuredOutputError("structured output needs the model's end-of-sequence token id; the model has none")
    key = (id(tokenizer), int(vocab_size), eos, grammar)
    with _grammar_lock:
        hit = _grammar_cache.get(key)
        if hit is not None:
            _grammar_cache.move_to_end(key)
            return hit
    llt = ll_tokenizer(tokenizer, vocab_size, eos[0])
    matcher = llg.LLMatcher(llt, grammar, log_level=0)
    if matcher.is_error():
        raise StructuredOutputError(f"the response_format does not compile: {matcher.get_error()}")
    compiled = CompiledGrammar(matcher, int(vocab_size), eos, grammar, llt.vocab_size)
    with _grammar_lock:
        _grammar_cache[key] = compiled
        while len(_grammar_cache) > _CACHE_SIZE:
            _grammar_cache.popitem(last=False)
    return compiled


def compile_response_format(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int],
                            response_format: Any) -> CompiledGrammar | None:
    """``response_format`` compiled for a model (None when it asks for no constraint)."""
    grammar = grammar_of(response_format)
    return None if grammar is None else compile_grammar(tokenizer, vocab_size, eos_ids, grammar)


def is_cached(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int], response_format: Any) -> bool:
    """Whether compiling ``response_format`` for this model would hit the cache (so it is cheap)."""
    grammar = grammar_of(response_format)
    key = (id(tokenizer), int(vocab_size), tuple(int(e) for e in eos_ids), grammar)
    with _grammar_lock:
        return grammar is None or key in _grammar_cache


# Per-token timings of the masks (seconds), most recent first out: "fill" = computing a mask (in whatever
# thread ran it), "wait" = how long the sampler waited for it (the part not hidden behind the forward pass).
MASK_TIMINGS: dict[str, collections.deque] = {"fill": collections.deque(maxlen=1 << 16),
                                              "wait": collections.deque(maxlen=1 << 16)}

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _mask_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tta-mask")
        return _pool


class GrammarState:
    """One request's matcher: computes the allowed-token mask of the next step (optionally in a worker
    thread while the forward pass runs: llguidance releases the GIL) and consumes the sampled tokens."""

    def __init__(self, compiled: CompiledGrammar):
        self.compiled = compiled
        self.matcher = compiled.matcher.deep_copy()
        self.vocab_size = compiled.vocab_size
        self.eos_ids = np.asarray(compiled.eos_ids, dtype=np.int64)
        self._llg_eos = int(compiled.eos_ids[0])
        self.bitmask = np.zeros((1, (compiled.ll_vocab_size + 31) // 32), dtype=np.int32)
        self._pending: Future | None = None
        self._fresh = False  # bitmask holds the mask of the current state

    # -- mask --------------------------------------------------------------------------------------------
    def _fill(self) -> None:
        from llguidance.numpy import fill_next_token_bitmask

        t0 = time.perf_counter()
        fill_next_token_bitmask(self.matcher, self.bitmask)
        MASK_TIMINGS["fill"].append(time.perf_counter() - t0)

    def prepare(self) -> None:
        """Start computing the next step's mask in a worker thread (call before the forward pass)."""
        if self._pending is None and not self._fresh:
            try:
                self._pending = _mask_pool().submit(self._fill)
            except RuntimeError:  # the interpreter is exiting (the pool is shut down): wait() fills it inline
                pass

    def wait(self) -> None:
        """Make sure the mask of the current state is in ``bitmask`` (waits for ``prepare``'s work)."""
        if self._fresh and self._pending is None:
            return
        t0 = time.perf_counter()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        else:
            self._fill()
        self._fresh = True
        MASK_TIMINGS["wait"].append(time.perf_counter() - t0)

    def allowed(self) -> np.ndarray:
        """bool [vocab_size]: the tokens the grammar allows next (every EOS id of the model when it may end)."""
        self.wait()
        bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")
        allowed = bits[: self.vocab_size].view(bool)
        allowed[self.eos_ids] = bool(bits[self._llg_eos])
        return allowed

    def mask_logits(self, logits: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
        """A copy of ``logits`` [vocab] with disallowed tokens at -inf. When that leaves nothing (e.g.
        ``min_new_tokens`` masked the only allowed token, EOS), ``fallback`` logits are masked instead."""
        allowed = self.allowed()
        if not allowed.any():
            raise StructuredOutputError(
                f"the grammar allows no token here ({self.matcher.get_error() or self.matcher.stop_reason()})")
        out = np.where(allowed, logits, np.float32(-np.inf)).astype(logits.dtype, copy=False)
        if fallback is not None and not np.isfinite(out.max()):
            out = np.where(allowed, fallback, np.float32(-np.inf)).astype(logits.dtype, copy=False)
        return out

    # -- tokens ------------------------------------------------------------------------------------------
    def consume(self, token: int) -> None:
        self.wait_idle()
        if not self.matcher.consume_token(int(token)):
            raise StructuredOutputError(
                f"token {int(token)} was rejected by the grammar: {self.matcher.get_error()}")
        self._fresh = False

    def wait_idle(self) -> None:
        """Wait for a mask computation in flight (before the matcher is advanced or dropped)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
            self._fresh = True

    @property
    def is_stopped(self) -> bool:
        """No token but EOS can follow: the output is complete."""
        return self.matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()

    def close(self) -> None:
        """Free the matcher (after any mask computation in flight)."""
        self.wait_idle()
        self.matcher = None


# --- validation -------------------------------------------------------------------------------------------

def validate_output(text: str, output_model: Any, *, finish_reason: str | None = None) -> Any:
    """Parse ``text`` as ``output_model`` (a Pydantic model class -> an instance; a JSON Schema dict or
    OpenAI json_schema/json_object format -> the parsed JSON, validated with jsonschema). Raises
    :class:`StructuredOutputError` with the raw text when it does not parse or validate."""
    if finish_reason == "length":
        raise StructuredOutputError(
            "the output hit max_tokens before the grammar was complete; raise max_tokens", raw_text=text,
            finish_reason=finish_reason)
    if _is_pydantic_model(output_model):
        from pydantic import ValidationError

        try:
            return output_model.model_validate_json(text)
        except ValidationError as exc:
            raise StructuredOutputError(f"the output does not validate as {output_model.__name__}: {exc}",
                                        raw_text=text, finish_reason=finish_reason) from exc
    schema = output_model
    if isinstance(schema, Mapping) and schema.get("type") == "json_schema":
        schema = schema.get("json_schema", {}).get("schema", {})
    elif isinstance(schema, Mapping) and schema.get("type") == "json_object":
        schema = {"type": "object"}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StructuredOutputError(f"the output is not JSON: {exc}", raw_text=text,
                                    finish_reason=finish_reason) from exc
    _check_schema(value, schema, text)
    return value


def _check_schema(value: Any, schema: Any, text: str) -> None:
    try:
        import jsonschema
    except ImportError as exc:
        raise BackendUnavailableError("validating against a JSON Schema dict needs jsonschema: "
                                      "pip install 'tta-engine[structured]'") from exc
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        raise StructuredOutputError(f"the output does not validate against the schema: {exc.message}",
                                    raw_text=text) from exc
    except jsonschema.SchemaError as exc:
        raise StructuredOutputError(f"the JSON Schema is invalid: {exc.message}", raw_text=text) from exc


def compile_for_model(lm: Any, response_format: Any) -> CompiledGrammar | None:
    """``response_format`` compiled for a LanguageModel (its tokenizer, logits width and EOS ids)."""
    return compile_response_format(lm.tokenizer, lm.backend.vocab_size, lm.eos_ids, response_format)


async def acompile_for_model(lm: Any, response_format: Any) -> CompiledGrammar | None:
    """As :func:`compile_for_model`; a cold compile runs in a worker thread so the event loop keeps going."""
    if response_format is None:
        return None
    if is_cached(lm.tokenizer, lm.backend.vocab_size, lm.eos_ids, response_format):
        return compile_for_model(lm, response_format)
    import asyncio

    return await asyncio.to_thread(compile_for_model, lm, response_format)
