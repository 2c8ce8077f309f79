"""Validation of what callers hand the engine: prompts, chat messages and texts to embed.

One place for it, used by the manager, ``LanguageModel.encode_prompt`` and the encoders: anything that
is not a valid input raises ``InvalidInputError`` (or its subclass ``EmptyInputError``) naming the problem
and the fix, before a tokenizer or a chat template sees it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ContextLengthError, EmptyInputError, InvalidInputError

ROLES = ("system", "user", "assistant", "tool")
_MESSAGE_HINT = "pass a list of {'role': ..., 'content': ...} dicts (or objects with .role and .content)"


def check_text(text: Any, what: str = "text") -> str:
    """``text`` as a str with valid Unicode (no lone surrogates); bytes and other types are refused."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        raise InvalidInputError(f"{what} is bytes, not str: decode it first, e.g. "
                                "data.decode('utf-8', errors='replace')")
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} must be a str, got {type(text).__name__}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(
                f"{what} holds a lone surrogate {text[exc.start]!r} at index {exc.start}, which is not valid "
                "Unicode; decode input with errors='replace' (or strip the character)") from None
    return str(text)


def _field(message: Any, key: str, index: int) -> Any:
    if isinstance(message, Mapping):
        if key not in message:
            raise InvalidInputError(f"message {index} has no {key!r}: {_MESSAGE_HINT}")
        return message[key]
    if not hasattr(message, key):
        raise InvalidInputError(f"message {index} is a {type(message).__name__} without .{key}: {_MESSAGE_HINT}")
    return getattr(message, key)


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages (dicts or the game's Message objects) as ``[{'role', 'content'}]`` dicts."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
        raise InvalidInputError(f"messages must be a list, got {type(messages).__name__}: {_MESSAGE_HINT}")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, (str, bytes)):
            raise InvalidInputError(f"message {i} is a {type(m).__name__}, not a message: {_MESSAGE_HINT}")
        role = _field(m, "role", i)
        role = getattr(role, "value", role)  # an Enum of roles
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidInputError(f"message {i} has role {role!r}; allowed roles: {', '.join(ROLES)}")
        out.append({"role": role, "content": check_text(_field(m, "content", i), f"message {i} content")})
    if not out:
        raise EmptyInputError("the message list is empty: pass at least one {'role', 'content'} message")
    if not any(m["content"].strip() for m in out):
        raise EmptyInputError("every message is empty: give at least one message some text")
    return out


def check_prompt(prompt: Any) -> str | list[dict[str, str]]:
    """A raw-text prompt (non-blank str) or a list of chat messages (see ``check_messages``)."""
    if isinstance(prompt, str):
        prompt = check_text(prompt, "the prompt")
        if not prompt.strip():
            raise EmptyInputError("the prompt is empty (or only whitespace): pass some text or a list of messages")
        return prompt
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        check_text(prompt, "the prompt")
    if prompt is None or isinstance(prompt, (int, float, complex, bool)):
        raise InvalidInputError(f"the prompt must be a str or a list of messages, got {type(prompt).__name__}")
    return check_messages(prompt)


def check_texts(texts: Any) -> list[str]:
    """Texts to embed: one str or an iterable of str (empty strings allowed; at least one text)."""
    if isinstance(texts, str):
        return [check_text(texts)]
    if isinstance(texts, (bytes, bytearray, memoryview, Mapping)) or not isinstance(texts, Iterable):
        raise InvalidInputError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    out = [check_text(t, f"text {i}") for i, t in enumerate(texts)]
    if not out:
        raise EmptyInputError("no texts to embed: pass at least one string")
    return out


def prompt_chars(prompt: str | list[dict[str, str]]) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)


def check_prompt_size(prompt: str | list[dict[str, str]], context_length: int, max_token_chars: int) -> None:
    """Refuse, before tokenizing, a prompt that cannot fit: no token spells more than ``max_token_chars``
    characters, so a prompt of more than ``context_length * max_token_chars`` characters has more tokens
    than the context holds (a 10^6-character prompt fails at once instead of after a second of BPE)."""
    n = prompt_chars(prompt)
    if max_token_chars > 0 and n > context_length * max_token_chars:
        raise ContextLengthError(
            f"the prompt has {n} characters, at least {n // max_token_chars} tokens, more than the context of "
            f"{context_length} tokens; shorten the prompt.")
