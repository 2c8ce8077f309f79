"""The runtime on tiny artifacts of every architecture, and the PyTorch fallback behind the same API."""

from __future__ import annotations

import asyncio
import gc
import time

import numpy as np
import pytest
import torch
from helpers import wait_until
from tiny_models import DECODER_ARCHS, tiny_model, tiny_tokenizer
from tta_engine.errors import ContextLengthError, EmptyInputError, SamplingParamError
from tta_engine.generator import generate_events
from tta_engine.ort_decoder import OrtDecoder
from tta_engine.runtime import LanguageModel, open_artifact_lm, open_torch_lm
from tta_engine.sampling import SamplingParams

MSGS = [{"role": "system", "content": "You are a calm narrator."},
        {"role": "user", "content": "The lantern flickers in the forest."}]


@pytest.fixture(scope="module")
def lms(artifacts, tiny_configs):
    made = {}

    def get(arch: str, backend: str = "onnx", precision: str = "fp32", graph: str = "auto"):
        key = (arch, backend, precision, graph)
        if key not in made:
            cfg = tiny_configs[f"tiny-{arch}"]
            if backend == "torch":
                made[key] = open_torch_lm(cfg)
            else:
                made[key] = open_artifact_lm(artifacts.get(cfg.name, precision, graph), cfg)
        return made[key]

    yield get
    for lm in made.values():
        lm.close()


@pytest.mark.parametrize("arch", DECODER_ARCHS)
@pytest.mark.parametrize("graph", ["auto", "optimum"])
def test_kv_cached_decode_equals_full_recomputation(artifacts, arch, graph):
    art = artifacts.get(f"tiny-{arch}", "fp32", graph)
    dec = OrtDecoder(art.file("model.onnx"), art.manifest["decoder"])
    rng = np.random.default_rng(0)
    ids = rng.integers(3, art.manifest["decoder"]["vocab_size"], size=20)
    cache = dec.new_cache(1, 4)
    dec.forward(cache, ids[None, :8])
    stepped = [dec.forward(cache, ids[None, i : i + 1])[0] for i in range(8, 20)]
    for i, logits in enumerate(stepped, start=9):
        fresh = dec.new_cache(1, 32)
        full = dec.forward(fresh, ids[None, :i])[0]
        np.testing.assert_allclose(logits, full, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", DECODER_ARCHS)
@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_greedy_chat_equals_pytorch_generate(lms, arch, backend):
    lm = lms(arch, backend)
    ids = lm.encode_prompt(MSGS)
    out = lm.generate(MSGS, temperature=0, max_new_tokens=32, min_new_tokens=32)
    model = tiny_model(arch)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             eos_token_id=lm.eos_ids, pad_token_id=0)
    assert out["token_ids"] == ref[0, len(ids):].tolist()
    assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == 32


@pytest.mark.parametrize("backend", ["onnx", "torch"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_stream_concatenation_equals_generate(lms, arch, backend):
    lm = lms(arch, backend)
    for kw in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 7}):
        full = lm.generate(MSGS, max_new_tokens=40, **kw)
        assert "".join(lm.stream(MSGS, max_new_tokens=40, **kw)) == full["text"]
        assert full["text"] == lm.tokenizer.decode(full["token_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_same_seed_same_sample_different_seed_differs(lms, backend):
    lm = lms("qwen2", backend)
    kw = dict(temperature=1.2, top_k=50, max_new_tokens=24, min_new_tokens=24)
    a = lm.generate(MSGS, seed=1, **kw)["token_ids"]
    assert lm.generate(MSGS, seed=1, **kw)["token_ids"] == a
    assert any(lm.generate(MSGS, seed=s, **kw)["token_ids"] != a for s in (2, 3, 4))


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_stop_string_split_across_tokens(lms, backend):
    lm = lms("llama", backend)
    ref = lm.generate(MSGS, temperature=0, max_new_tokens=30, min_new_tokens=30)
    pieces = [lm.tokenizer.decode([t]) for t in ref["token_ids"]]
    # a stop string made of the end of one token's text and the start of the next one's
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 1)
    stop = pieces[k][-2:] + pieces[k + 1][:1]
    start = ref["text"].find(stop)
    out = lm.generate(MSGS, temperature=0, max_new_tokens=30, min_new_tokens=30, stop=[stop])
    assert out["finish_reason"] == "stop"
    assert out["text"] == ref["text"][:start]
    assert "".join(lm.stream(MSGS, temperature=0, max_new_tokens=30, min_new_tokens=30, stop=[stop])) == out["text"]


class _CacheSpy:
    """Wraps a backend and records the caches it hands out, to check they are freed."""

    def __init__(self, backend):
        self.inner, self.caches, self.steps = backend, [], 0
        self.context_length = backend.context_length

    def new_cache(self, *a, **k):
        c = self.inner.new_cache(*a, **k)
        self.caches.append(c)
        return c

    def forward(self, cache, ids, **k):
        self.steps += 1
        return self.inner.forward(cache, ids, **k)


def _closed(cache) -> bool:
    return getattr(cache, "keys", None) == [] or getattr(cache, "past", 1) in (None, {})


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_closing_a_stream_stops_and_frees(lms, backend):
    lm = lms("phi3", backend)
    spy = _CacheSpy(lm.backend)
    params = SamplingParams(temperature=0, max_new_tokens=200, min_new_tokens=200)
    stream = generate_events(spy, lm.tokenizer, lm.encode_prompt(MSGS), params, lm.eos_ids)
    for _ in zip(range(3), stream, strict=False):
        pass
    stream.close()
    steps = spy.steps
    assert steps < 10 and _closed(spy.caches[0])


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_cancelling_an_async_stream_stops_and_frees(lms, backend):
    lm = lms("llama", backend)
    spy = _CacheSpy(lm.backend)
    alm = LanguageModel("spy", spy, lm.tokenizer, lm.eos_ids, lm.defaults, kind=lm.kind)
    got = []

    async def consume():
        async for delta in alm.astream(MSGS, temperature=0, max_new_tokens=200, min_new_tokens=200):
            got.append(delta)

    async def main():
        task = asyncio.create_task(consume())
        while len(got) < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    sched = alm.scheduler
    assert wait_until(lambda: not sched.active and not sched.pending)  # dropped at its next step
    steps = spy.steps
    assert not sched.active and steps < 40 and _closed(spy.caches[0])
    gc.collect()
    time.sleep(0.05)
    assert spy.steps == steps  # nothing keeps decoding in the background
    alm.close()


class _ScriptedBackend:
    """Logits that force a given token sequence: tests the text path independently of the weights."""

    def __init__(self, script, vocab, context=128):
        self.script, self.vocab, self.context_length, self.pos = list(script), vocab, context, 0

    def new_cache(self, batch=1, capacity=0):
        from tta_engine.torch_backend import TorchKVCache

        self.pos = 0
        return TorchKVCache(batch)

    def forward(self, cache, ids, **k):
        logits = np.zeros((1, self.vocab), dtype=np.float32)
        logits[0, self.script[min(self.pos, len(self.script) - 1)]] = 10.0
        self.pos += 1
        return logits


def test_emoji_and_cjk_reply_streams_intact():
    tok = tiny_tokenizer()
    reply = "Calm 🎉 龍 river 🌊!"
    script = tok.encode(reply) + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert len(tok.encode("🎉")) > 1 and len(tok.encode("龍")) > 1  # byte-level pieces
    lm = LanguageModel("scripted", _ScriptedBackend(script, len(tok)), tok, [2], SamplingParams(), kind="onnx")
    deltas = list(lm.stream("hello", temperature=0, max_new_tokens=50))
    assert "".join(deltas) == reply
    assert all("\ufffd" not in d for d in deltas)
    assert "🎉" in deltas or any("🎉" in d for d in deltas)
    out = lm.generate("hello", temperature=0, max_new_tokens=50)
    assert out["text"] == reply and out["finish_reason"] == "stop"
    lm.close()


def test_min_new_tokens_ignores_eos_until_reached():
    """EOS always wins the logits here and a different token comes second each step: with min_new_tokens=4
    the first 4 tokens are those runners-up (EOS masked out), then EOS ends the reply."""
    tok = tiny_tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    second = tok.encode(" river calm lake")

    class EosFirst(_ScriptedBackend):
        def forward(self, cache, ids):
            logits = np.zeros((1, self.vocab), dtype=np.float32)
            logits[0, eos] = 10.0
            logits[0, second[min(self.pos, len(second) - 1)]] = 5.0
            self.pos += 1
            return logits

    lm = LanguageModel("eos", EosFirst([eos], len(tok)), tok, [eos], SamplingParams(), kind="onnx")
    assert lm.generate("x", temperature=0, max_new_tokens=10)["usage"]["completion_tokens"] == 0
    out = lm.generate("x", temperature=0, max_new_tokens=10, min_new_tokens=4)
    want = [second[min(i, len(second) - 1)] for i in range(4)]
    assert out["token_ids"] == want and eos not in out["token_ids"]
    assert out["text"] == tok.decode(want) and out["finish_reason"] == "stop"
    sampled = lm.generate("x", temperature=1.0, seed=3, max_new_tokens=10, min_new_tokens=6)
    assert len(sampled["token_ids"]) >= 6 and eos not in sampled["token_ids"][:6]
    lm.close()


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_errors_are_typed_and_say_what_to_do(lms, backend):
    lm = lms("gemma3", backend)
    long_prompt = [{"role": "user", "content": "forest " * 400}]
    with pytest.raises(ContextLengthError, match=r"\d+ prompt tokens \+ \d+ new tokens exceed the context of 256"):
        lm.generate(long_prompt, max_new_tokens=8)
    for bad in ({"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"max_new_tokens": 0},
                {"max_tokens": 0}, {"bogus_option": 1}):
        with pytest.raises(SamplingParamError):
            lm.generate(MSGS, **bad)
    with pytest.raises(EmptyInputError, match="message list is empty"):
        lm.generate([])
    with pytest.raises(EmptyInputError):
        lm.generate("")


def test_async_and_callback_forms(lms):
    lm = lms("llama")
    seen = []

    async def main():
        text = await lm.generate_streaming(MSGS, seen.append, temperature=0, max_new_tokens=16)
        comp = await lm.agenerate(MSGS, temperature=0, max_new_tokens=16)
        return text, comp

    text, comp = asyncio.run(main())
    assert "".join(seen) == text == comp["text"] == lm.generate(MSGS, temperature=0, max_new_tokens=16)["text"]


def test_int4_artifact_generates_through_same_api(lms):
    lm = lms("llama", "onnx", "int4")
    out = lm.generate(MSGS, temperature=0, max_new_tokens=8, min_new_tokens=8)
    assert out["usage"]["completion_tokens"] == 8 and lm.kind == "onnx"


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_torch_fallback_with_bitsandbytes(tiny_dirs, quant):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from conftest import tiny_cfg

    cfg = tiny_cfg("tiny-llama-bnb", tiny_dirs["llama"], backend="torch", quantization=quant)
    lm = open_torch_lm(cfg)
    fp32 = open_torch_lm(tiny_cfg("tiny-llama-fp32", tiny_dirs["llama"], backend="torch"))
    linear = lm.backend.model.model.layers[0].mlp.up_proj
    assert isinstance(linear, bnb.nn.Linear8bitLt if quant == "8bit" else bnb.nn.Linear4bit)
    out = lm.generate(MSGS, temperature=0, max_new_tokens=8, min_new_tokens=8)
    assert out["usage"]["completion_tokens"] == 8 and lm.kind == "torch"
    # same API, same streaming; the quantized logits stay close to fp32
    assert "".join(lm.stream(MSGS, temperature=0, max_new_tokens=8, min_new_tokens=8)) == out["text"]
    ids = np.array([lm.encode_prompt(MSGS)])
    p, q = (b.backend.forward(b.backend.new_cache(1), ids)[0] for b in (fp32, lm))
    lp = p - np.log(np.exp(p - p.max()).sum()) - p.max()
    lq = q - np.log(np.exp(q - q.max()).sum()) - q.max()
    assert float((np.exp(lp) * (lp - lq)).sum()) < (0.01 if quant == "8bit" else 0.1)


def test_async_requests_run_on_the_scheduler_started_once(lms):
    from tta_engine.errors import ConfigError, ModelUnloadedError

    class Borrowed:  # the shared fixture's backend, which this model's close() must not free
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            if name == "close":
                raise AttributeError(name)
            return getattr(self._inner, name)

    base = lms("llama")
    lm = LanguageModel("sched", Borrowed(base.backend), base.tokenizer, base.eos_ids, base.defaults, kind=base.kind)
    sched = lm.start_scheduler(max_batch=2, prefix_cache_entries=0)
    with pytest.raises(ConfigError, match="already running"):
        lm.start_scheduler()

    async def main():
        return await asyncio.gather(*(lm.agenerate(MSGS, temperature=0, max_new_tokens=8) for _ in range(3)))

    outs = asyncio.run(main())
    assert lm.scheduler is sched and sched.steps > 0
    assert {o["text"] for o in outs} == {base.generate(MSGS, temperature=0, max_new_tokens=8)["text"]}
    lm.close()
    with pytest.raises(ModelUnloadedError):
        asyncio.run(lm.agenerate(MSGS, max_new_tokens=2))
