"""The runtime's tokenizer: Hugging Face ``tokenizers`` (Rust) plus the chat template, no Transformers.

An artifact carries ``tokenizer.json`` (the fast tokenizer's full state: normalizer, pre-tokenizer,
model, post-processor, added tokens), the chat template's Jinja source and the special tokens, all
named in the manifest's ``tokenizer`` section. :class:`Tokenizer` reads them and offers the subset of
``PreTrainedTokenizerFast`` that the engine uses -- ``encode`` / ``__call__``, ``decode``,
``apply_chat_template``, the special token ids -- with the same results (tested against Transformers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .chat_template import render_chat
from .errors import ArtifactError

TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _backend_from_str(data: str):
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(data)
    backend.no_padding()
    backend.no_truncation()
    return backend


class Tokenizer:
    """Encode, decode and render chats like the model's Transformers tokenizer (thread-safe)."""

    def __init__(self, backend, *, chat_template: str | None = None,
                 special_tokens: Mapping[str, Any] | None = None, clean_up_tokenization_spaces: bool = False,
                 truncation_side: str = "right"):
        self._backend = backend
        self.chat_template = chat_template or None
        self.special_tokens = dict(special_tokens or {})
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.truncation_side = truncation_side
        for key in SPECIAL_KEYS:
            token = self.special_tokens.get(key)
            setattr(self, f"{key}_id", backend.token_to_id(token) if isinstance(token, str) else None)

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_artifact(cls, path: Path, section: Mapping[str, Any] | None) -> Tokenizer:
        """The tokenizer named by an artifact manifest's ``tokenizer`` section."""
        if not section or not (Path(path) / section.get("file", TOKENIZER_FILE)).is_file():
            raise ArtifactError(f"{path} has no tokenizer in its manifest (an artifact of an older tta-engine); "
                                "re-export the model with this version of tta-engine (`tta-engine export NAME`).")
        template = section.get("chat_template")
        return cls(_backend_from_str((Path(path) / section["file"]).read_text(encoding="utf-8")),
                   chat_template=(Path(path) / template).read_text(encoding="utf-8") if template else None,
                   special_tokens=section.get("special_tokens"),
                   clean_up_tokenization_spaces=section.get("clean_up_tokenization_spaces", False),
                   truncation_side=section.get("truncation_side", "right"))

    @classmethod
    def from_transformers(cls, hf_tokenizer) -> Tokenizer:
        """The same tokenizer from a Transformers fast tokenizer object (used at export; no import here)."""
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ArtifactError(f"{type(hf_tokenizer).__name__} is not a fast tokenizer: the runtime needs a "
                                "tokenizer.json (Hugging Face `tokenizers`); use a model with a fast tokenizer")
        template = hf_tokenizer.chat_template
        if isinstance(template, dict):  # named templates: apply_chat_template uses "default" without tools
            template = template.get("default")
        return cls(_backend_from_str(backend.to_str()), chat_template=template,
                   special_tokens=dict(hf_tokenizer.special_tokens_map),
                   clean_up_tokenization_spaces=bool(getattr(hf_tokenizer, "clean_up_tokenization_spaces", False)),
                   truncation_side=getattr(hf_tokenizer, "truncation_side", "right"))

    def save(self, out_dir: Path) -> dict[str, Any]:
        """Write ``tokenizer.json`` (+ the chat template) into ``out_dir``; returns the manifest section."""
        self._backend.save(str(Path(out_dir) / TOKENIZER_FILE))
        if self.chat_template:
            (Path(out_dir) / CHAT_TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")
        return {
            "file": TOKENIZER_FILE,
            "chat_template": CHAT_TEMPLATE_FILE if self.chat_template else None,
            "special_tokens": self.special_tokens,
            "special_token_ids": {f"{k}_id": getattr(self, f"{k}_id") for k in SPECIAL_KEYS
                                  if getattr(self, f"{k}_id") is not None},
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "truncation_side": self.truncation_side,
        }

    def truncating(self, max_length: int) -> Tokenizer:
        """A copy that truncates every encoding to ``max_length`` tokens (special tokens kept), as
        ``tokenizer(texts, truncation=True, max_length=max_length)`` does."""
        backend = _backend_from_str(self._backend.to_str())
        backend.enable_truncation(max_length, stride=0, strategy="longest_first", direction=self.truncation_side)
        return Tokenizer(backend, chat_template=self.chat_template, special_tokens=self.special_tokens,
                         clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
                         truncation_side=self.truncation_side)

    # -- encode / decode -----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        """``input_ids``, ``attention_mask`` and ``token_type_ids`` of each text (no padding), and
        ``truncated``: whether truncation (``truncating``) cut the text."""
        encs = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encs], "attention_mask": [e.attention_mask for e in encs],
                "token_type_ids": [e.type_ids for e in encs], "truncated": [bool(e.overflowing) for e in encs]}

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return self.encode_batch(text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if clean:
            for old, new in _CLEAN_UP:
                text = text.replace(old, new)
        return text

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    # -- chat ----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                            tokenize: bool = True, **kwargs: Any) -> list[int] | str:
        """Like Transformers: render with the special tokens in scope, then encode without adding any."""
        text = render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           special_tokens=self.special_tokens, **kwargs)
        if not tokenize:
            return text
        return self.encode(text, add_special_tokens=not self.chat_template)


def as_tokenizer(tokenizer) -> Tokenizer:
    """An engine :class:`Tokenizer` as is; a Transformers tokenizer converted (benchmarks pass either)."""
    return tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_transformers(tokenizer)
