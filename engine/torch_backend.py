"""PyTorch fallback backend: a Transformers causal LM (optionally bitsandbytes 8/4-bit) behind the same
``new_cache`` / ``forward`` interface as the ONNX Runtime decoder, so the generator, sampling,
streaming, stop strings and errors are shared."""

from __future__ import annotations

import numpy as np

from .errors import context_exceeded


class TorchKVCache:
    def __init__(self, batch: int):
        self.past = None
        self.lengths = np.zeros(batch, dtype=np.int64)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def close(self) -> None:
        self.past = None


class TorchDecoder:
    layout = "torch"

    def __init__(self, model, context_length: int | None = None):
        self.model = model.eval()
        self.context_length = int(context_length or getattr(model.config, "max_position_embeddings", 2048))
        self.vocab_size = int(model.config.vocab_size)
        self.device = next(model.parameters()).device

    def new_cache(self, batch: int = 1, capacity: int = 0) -> TorchKVCache:
        return TorchKVCache(batch)

    def forward(self, cache: TorchKVCache, input_ids: np.ndarray, *, all_logits: bool = False) -> np.ndarray:
        import torch

        new_lengths = cache.lengths + input_ids.shape[1]
        if int(new_lengths.max()) > self.context_length:
            raise context_exceeded(int(new_lengths.max()), self.context_length)
        if cache.past is None:
            from transformers import DynamicCache

            cache.past = DynamicCache()
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)
        with torch.inference_mode():
            out = self.model(ids, past_key_values=cache.past, use_cache=True)
        cache.past = out.past_key_values
        cache.lengths = new_lengths
        logits = out.logits if all_logits else out.logits[:, -1, :]
        return logits.float().cpu().numpy()

    def close(self) -> None:
        self.model = None
