"""Streaming text out of a decode loop: incremental detokenization and stop-string matching.

``IncrementalDetokenizer`` turns token ids into final text deltas, the way vLLM and TGI do it: it decodes a
short window of previous ids with and without the new ones (``prefix_offset`` / ``read_offset``) and emits
the difference, so SentencePiece leading spaces come out right, and it holds back ids while their text ends
in U+FFFD (an incomplete UTF-8 character, e.g. the first bytes of an emoji in a byte-level BPE).

``StopStringMatcher`` holds back the tail of the text that could still become a stop string, so a stop
string split over several deltas is never emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import SamplingParamError

_PROMPT_CONTEXT = 6  # last prompt ids kept as left context (vLLM keeps 5 + the read window)
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Token ids in, final UTF-8-complete text deltas out.

    Without prompt ids, the concatenation of all deltas plus ``flush()`` equals
    ``tokenizer.decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)``. With prompt ids,
    the first generated token keeps the leading space a SentencePiece decoder would strip at string start.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] | None = None, *,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        ctx = [int(i) for i in prompt_ids[-_PROMPT_CONTEXT:]] if prompt_ids is not None else []
        self._ids: list[int] = ctx  # window: [prefix_offset ... read_offset ... end]
        self._prefix_offset = 0
        self._read_offset = len(ctx)
        self._generated: list[int] = []

    @property
    def token_ids(self) -> list[int]:
        """The generated ids pushed so far (a copy)."""
        return list(self._generated)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _advance(self, force: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not force):
            if force:  # nothing new to emit; the window is done
                self._prefix_offset = self._read_offset = len(self._ids)
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        # Drop ids left of the window so that memory and decode cost stay bounded.
        del self._ids[:self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        return delta

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that became final (possibly "")."""
        tid = int(token_id)
        self._generated.append(tid)
        self._ids.append(tid)
        return self._advance(force=False)

    def push_many(self, token_ids: Sequence[int]) -> str:
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """Everything still held back (an incomplete character comes out as U+FFFD, as decode() does)."""
        if self._read_offset >= len(self._ids):
            return ""
        return self._advance(force=True)


class StopStringMatcher:
    """Filters a stream of text deltas, cutting it before the first stop string.

    ``push(delta)`` returns (text safe to emit now, stopped). Text that could be the beginning of a stop
    string is held back until it either completes one (then everything from the stop string on is dropped
    and stopped=True) or cannot any more (then it is released). After a stop, ``push`` returns ("", True).
    """

    def __init__(self, stops: Sequence[str] = ()):
        if isinstance(stops, str):
            stops = (stops,)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise SamplingParamError(f"invalid stop string {s!r}; allowed: non-empty str")
        self.stops = tuple(dict.fromkeys(stops))
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the stream

    def _hold_length(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        for n in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        text = self._held + delta
        hits = [(pos, s) for s in self.stops if (pos := text.find(s)) >= 0]
        if hits:
            pos, self.matched = min(hits, key=lambda h: h[0])
            self.stopped = True
            self._held = ""
            return text[:pos], True
        n = self._hold_length(text)
        self._held = text[len(text) - n:] if n else ""
        return text[:len(text) - n], False

    def flush(self) -> str:
        """Release the held tail at the end of the stream ("" after a stop)."""
        out, self._held = self._held, ""
        return "" if self.stopped else out
