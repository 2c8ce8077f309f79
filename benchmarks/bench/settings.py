"""Run settings: the default models, the sweeps and how many tokens and repetitions each part uses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DEFAULT_MODELS = ("smollm2-135m-instruct", "all-minilm-l6-v2")
CONTEXT_LENGTHS = (256, 512, 1024, 2048)
STREAMS = (1, 2, 4, 8, 16)


@dataclass
class BenchSettings:
    prompt_tokens: int = 280  # cap on the chat prompt (~270 tokens for SmolLM2), cut further to fit the context
    new_tokens: int = 128
    reps: int = 3
    warmup_tokens: int = 16
    pause_s: float = 0.2
    context_lengths: tuple[int, ...] = CONTEXT_LENGTHS
    context_new_tokens: int = 32
    context_reps: int = 1
    streams: tuple[int, ...] = STREAMS
    stream_new_tokens: int = 64
    overhead_reps: int = 3
    emb_sentences: int = 256
    emb_batch_size: int = 32
    emb_reps: int = 3
    emb_single_reps: int = 30
    rss: str = "subprocess"  # "subprocess" | "delta" | "off"
    fidelity: bool = True
    greedy_steps: int = 32
    threads: int | None = None
    device: str | None = None  # tta-engine's engines: 'auto' | 'cpu' | 'cuda' | 'cuda:N' (None: the config's)

    @classmethod
    def quick(cls, **overrides) -> BenchSettings:
        base = dict(new_tokens=64, reps=2, warmup_tokens=8, pause_s=0.1, context_new_tokens=16,
                    stream_new_tokens=32, overhead_reps=2, emb_sentences=128, emb_reps=2, emb_single_reps=15,
                    rss="delta", greedy_steps=16)
        base.update(overrides)
        return cls(**base)

    def replace(self, **kw) -> BenchSettings:
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})
