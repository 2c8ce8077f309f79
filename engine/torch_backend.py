"""PyTorch fallback backend: a Transformers causal LM (optionally bitsandbytes 8/4-bit) behind the same
``new_cache`` / ``forward`` interface as the ONNX Runtime decoder, so the generator, sampling,
streaming, stop strings and errors are shared."""

from __future__ import annotations

import numpy as np

from .errors import ContextLengthError


class TorchKVCache:
    def __init__(self, batch: int):
        self.past = None
        self.lengths = np.zeros(batch, dtype=np.int64)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def rewind(self, length: int, row: int | None = None) -> None:
        if self.past is not None and int(self.lengths.max()) > length:
            self.past.crop(length)
        self.lengths[:] = np.minimum(self.lengths, length)

    @property
    def nbytes(self) -> int:
        return 0

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
            raise ContextLengthError(
                f"{int(new_lengths.max())} tokens exceed the context of {self.context_length} tokens; "
                "shorten the prompt or lower max_new_tokens."
            )
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
