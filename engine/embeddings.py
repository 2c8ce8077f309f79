"""Sentence embeddings: an ONNX encoder artifact (or sentence-transformers as the PyTorch fallback)
behind one ``encode(texts, batch_size, normalize) -> np.ndarray [n, dim]`` signature.

Like sentence-transformers: texts are sorted by length, batched, pooled as the model's own pooling
config says (mean over the attention mask for all-MiniLM-L6-v2), optionally normalized, and returned
in the caller's order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .device import Device, resolve_device
from .inputs import check_texts
from .ort_session import create_session

POOLING_MODES = ("mean", "cls", "max", "lasttoken")


def read_pooling(model_dir: Path) -> tuple[str, bool, int]:
    """(pooling mode, normalize, max_seq_length) of an encoder directory.

    Artifacts carry ``pooling.json`` (written at export from the live sentence-transformers model);
    otherwise the sentence-transformers files are read (v2-v5 layouts).
    """
    explicit = model_dir / "pooling.json"
    if explicit.is_file():
        cfg = json.loads(explicit.read_text())
        return cfg["mode"], bool(cfg["normalize"]), int(cfg["max_seq_length"])
    mode, normalize, max_len = "mean", False, None
    modules = model_dir / "modules.json"
    if modules.is_file():
        for mod in json.loads(modules.read_text()):
            kind = mod.get("type", "")
            if kind.endswith("Normalize"):
                normalize = True
            if kind.endswith("Pooling"):
                cfg = json.loads((model_dir / mod["path"] / "config.json").read_text())
                mode = cfg.get("pooling_mode") or next(
                    (m for m in POOLING_MODES if cfg.get(f"pooling_mode_{m}_tokens") or cfg.get(f"pooling_mode_{m}_token")),
                    "mean")
    sbert = model_dir / "sentence_bert_config.json"
    if sbert.is_file():
        max_len = json.loads(sbert.read_text()).get("max_seq_length")
    if max_len is None and (model_dir / "config.json").is_file():
        max_len = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    return mode, normalize, int(max_len or 512)


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """hidden [batch, seq, dim], mask [batch, seq] -> [batch, dim]."""
    if mode == "cls":
        return hidden[:, 0]
    m = mask[..., None].astype(hidden.dtype)
    if mode == "max":
        return np.where(m > 0, hidden, -np.inf).max(axis=1)
    if mode == "lasttoken":
        last = mask.sum(axis=1).astype(np.int64) - 1
        return hidden[np.arange(len(hidden)), last]
    return (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


class OrtEncoder:
    """An exported encoder artifact directory: model.onnx, tokenizer files, pooling config."""

    def __init__(self, path: Path, *, threads: int | None = None, device: str | Device = "auto",
                 model_file: str = "model.onnx", tokenizer=None):
        from .artifact import read_manifest
        from .tokenizer import Tokenizer

        self.path = path = Path(path)
        self.device = resolve_device(device, "onnx")  # ORT copies the token ids in, the hidden states out
        self.pooling, self.normalize, self.max_seq_length = read_pooling(path)
        if tokenizer is None:
            tokenizer = Tokenizer.from_artifact(path, read_manifest(path).get("tokenizer"))
        self.tokenizer = tokenizer.truncating(self.max_seq_length)
        self.session = create_session(path / model_file, threads=threads, device=self.device)
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.dimension = int(self.session.get_outputs()[0].shape[-1])

    def _forward(self, ids: list[list[int]], extra: dict[str, list[list[int]]]) -> np.ndarray:
        """One batch of token id lists (any lengths) -> pooled embeddings [batch, dim]."""
        lengths = [len(x) for x in ids]
        shape = (len(ids), max(lengths))
        input_ids = np.full(shape, self.tokenizer.pad_token_id or 0, dtype=np.int64)
        mask = np.zeros(shape, dtype=np.int64)
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        for name in extra:
            feeds[name] = np.zeros(shape, dtype=np.int64)
        for r, n in enumerate(lengths):
            input_ids[r, :n] = ids[r]
            mask[r, :n] = 1
            for name, rows in extra.items():
                feeds[name][r, :n] = rows[r]
        if "token_type_ids" in self.input_names and "token_type_ids" not in feeds:
            feeds["token_type_ids"] = np.zeros(shape, dtype=np.int64)
        hidden = self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})[0]
        return pool(hidden, mask, self.pooling)

    def encode(self, texts, batch_size: int = 32, normalize: bool | None = None) -> np.ndarray:
        """Tokenize everything at once, sort by *token* length (less padding than sorting by characters),
        run batches, pool, restore the input order, normalize."""
        return self.encode_counted(texts, batch_size, normalize)[0]

    def encode_counted(self, texts, batch_size: int = 32,
                       normalize: bool | None = None) -> tuple[np.ndarray, list[int], list[bool]]:
        """As ``encode``, plus each text's token count (after truncation) and whether the window
        (``max_seq_length``) truncated it, from the one tokenization the encoding needs."""
        texts = check_texts(texts)
        enc = self.tokenizer.encode_batch(texts)
        ids = enc["input_ids"]
        extra = {k: v for k, v in enc.items() if k in self.input_names and k not in ("input_ids", "attention_mask")}
        order = np.argsort([-len(x) for x in ids], kind="stable")
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self._forward([ids[i] for i in idx], {k: [v[i] for i in idx] for k, v in extra.items()})
        if self.normalize if normalize is None else normalize:
            out = l2_normalize(out)
        return out, [len(x) for x in ids], enc["truncated"]

    def close(self) -> None:
        self.session = None


class TorchEncoder:
    """PyTorch fallback: sentence-transformers itself, behind the same signature."""

    def __init__(self, model_dir: Path, *, device: str | Device = "auto"):
        from .extras import require_extra

        require_extra("torch", "the sentence-transformers fallback (no compiled artifact)",
                      ("torch", "sentence_transformers"))
        from sentence_transformers import SentenceTransformer

        self.device = resolve_device(device, "torch")
        self.model = SentenceTransformer(str(model_dir), device=self.device.torch_name)
        self.pooling, self.normalize, self.max_seq_length = read_pooling(model_dir)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(get_dim())

    def encode(self, texts, batch_size: int = 32, normalize: bool | None = None) -> np.ndarray:
        texts = check_texts(texts)
        out = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=False)
        out = out.astype(np.float32)
        if self.normalize if normalize is None else normalize:
            out = l2_normalize(out)
        return out

    def encode_counted(self, texts, batch_size: int = 32,
                       normalize: bool | None = None) -> tuple[np.ndarray, list[int], list[bool]]:
        """As ``OrtEncoder.encode_counted`` (the fallback tokenizes once more for the counts)."""
        out = self.encode(texts, batch_size, normalize)
        lengths = [len(x) for x in self.model.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
        limit = self.max_seq_length or self.model.max_seq_length
        return out, [min(n, limit) for n in lengths], [n > limit for n in lengths]

    def close(self) -> None:
        self.model = None


def open_encoder(cfg, *, artifacts_root=None, backend: str | None = None, cache_dir: str | None = None,
                 threads: int | None = None, device: str | None = None):
    """The ONNX artifact, else (backend "auto", nothing published) sentence-transformers; nothing is
    exported here (see ``open_language_model`` for the rules). ``device``: default the config's
    ('auto' | 'cpu' | 'cuda' | 'cuda:N')."""
    from .artifact import artifact_dir, load_artifact
    from .runtime import use_artifact
    from .sources import resolve_source

    device = device or cfg.device
    path = artifact_dir(artifacts_root, cfg.name, cfg.precision)
    if use_artifact(path, backend or cfg.backend):
        return OrtEncoder(load_artifact(path).path, threads=threads, device=device)
    return TorchEncoder(resolve_source(cfg, cache_dir).directory, device=device)
