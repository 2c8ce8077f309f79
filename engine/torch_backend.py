"""PyTorch fallback backend: a Transformers causal LM (optionally bitsandbytes 8/4-bit) behind the same
``new_cache`` / ``forward`` interface as the ONNX Runtime decoder, so the generator, sampling,
streaming, stop strings and errors are shared.

The model runs where it was loaded (engine/sources.py moves it to the resolved device). On a GPU the KV
cache is Transformers' ``StaticCache`` (preallocated for the request's prompt + new tokens: no
reallocation per step, fixed addresses) when the caller says how many positions it needs; elsewhere
a ``DynamicCache``. Only the last position's logits cross to the host each step."""

from __future__ import annotations

import numpy as np

from .errors import context_exceeded


class TorchKVCache:
    def __init__(self, batch: int, capacity: int = 0):
        self.past = None
        self.capacity = capacity  # positions a static cache is allocated for (0: dynamic)
        self.lengths = np.zeros(batch, dtype=np.int64)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def close(self) -> None:
        self.past = None


class TorchDecoder:
    layout = "torch"

    def __init__(self, model, context_length: int | None = None, *, static_cache: bool | None = None):
        self.model = model.eval()
        self.context_length = int(context_length or getattr(model.config, "max_position_embeddings", 2048))
        self.vocab_size = int(model.config.vocab_size)
        self.device = next(model.parameters()).device
        # default: static on a GPU (where allocation per step costs), dynamic on the CPU (as before)
        self.static_cache = self.device.type == "cuda" if static_cache is None else static_cache

    def new_cache(self, batch: int = 1, capacity: int = 0) -> TorchKVCache:
        return TorchKVCache(batch, min(capacity, self.context_length) if self.static_cache else 0)

    def forward(self, cache: TorchKVCache, input_ids: np.ndarray, *, all_logits: bool = False) -> np.ndarray:
        import torch

        new_lengths = cache.lengths + input_ids.shape[1]
        if int(new_lengths.max()) > self.context_length:
            raise context_exceeded(int(new_lengths.max()), self.context_length)
        if cache.past is None:
            cache.past = self._new_past(cache)
        if cache.capacity and int(new_lengths.max()) > cache.capacity:
            raise context_exceeded(int(new_lengths.max()), cache.capacity)  # the request's own budget
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)
        past = int(cache.lengths.max())
        kwargs = {}
        if cache.capacity:  # a static cache writes at explicit positions
            kwargs["cache_position"] = torch.arange(past, past + ids.shape[1], device=self.device)
        with torch.inference_mode():
            out = self.model(ids, past_key_values=cache.past, use_cache=True, **kwargs)
        cache.past = out.past_key_values
        cache.lengths = new_lengths
        logits = out.logits if all_logits else out.logits[:, -1, :]
        return logits.float().cpu().numpy()

    def _new_past(self, cache: TorchKVCache):
        if cache.capacity:
            from transformers import StaticCache

            return StaticCache(config=self.model.config, max_cache_len=cache.capacity)
        from transformers import DynamicCache

        return DynamicCache()

    def close(self) -> None:
        self.model = None
