"""LLMClient (the game's drop-in for _call_lm_studio) on a fake manager, plus one test on a real tiny model."""

from __future__ import annotations

import asyncio

import pytest
from tta_engine.client import (
    ClientModelConfig,
    GenerationRequest,
    GenerationResponse,
    GenerationTimeoutError,
    LLMClient,
    Message,
    messages_to_prompt,
)
from tta_engine.config import load_model_configs
from tta_engine.errors import (
    EmptyInputError,
    ModelNotAvailableError,
    NoCapableModelError,
    OverloadedError,
    SamplingParamError,
    TTAEngineError,
)

MESSAGES = [Message("system", "You are a calm narrator."), Message("user", "The lantern flickers.")]


class FakeManager:
    """Deterministic stand-in for TransformersModelManager.

    Replies ``texts[model]`` (default "[model] reply"), streams it in 4-character chunks, records every call
    as (method, prompt, model_name, kwargs), fails with ``fail[model]`` and sleeps ``delay[model]`` seconds
    (per chunk when streaming), recording cancellations.
    """

    def __init__(self, texts=None, fail=None, delay=None, stats=None, model_configs=None):
        self.texts, self.fail, self.delay = dict(texts or {}), dict(fail or {}), dict(delay or {})
        self._stats = stats
        if model_configs is not None:
            self.model_configs = model_configs
        self.calls: list[tuple[str, object, str, dict]] = []
        self.cancelled: list[str] = []

    def stats(self):
        return self._stats or {}

    def _text(self, model_name: str, kwargs: dict) -> str:
        text = self.texts.get(model_name, f"[{model_name}] reply")
        for s in kwargs.get("stop") or ():
            if s in text:
                text = text[: text.index(s)]
        return text

    async def _prelude(self, method, prompt, model_name, kwargs, wait=True):
        self.calls.append((method, prompt, model_name, kwargs))
        if model_name in self.fail:
            raise self.fail[model_name]
        if wait:
            await self._sleep(model_name)

    async def _sleep(self, model_name):
        try:
            await asyncio.sleep(self.delay.get(model_name, 0.0))
        except asyncio.CancelledError:
            self.cancelled.append(model_name)
            raise

    async def generate(self, prompt, model_name, **kwargs) -> str:
        await self._prelude("generate", prompt, model_name, kwargs)
        return self._text(model_name, kwargs)

    async def generate_streaming(self, prompt, model_name, callback, **kwargs) -> str:
        await self._prelude("generate_streaming", prompt, model_name, kwargs, wait=False)
        text = self._text(model_name, kwargs)
        for i in range(0, len(text), 4):
            await self._sleep(model_name)
            if callback is not None:
                res = callback(text[i: i + 4])
                if asyncio.iscoroutine(res):
                    await res
        return text

    async def complete(self, prompt, model_name, **kwargs):
        await self._prelude("complete", prompt, model_name, kwargs)
        text = self._text(model_name, kwargs)
        n_prompt = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
        return {"text": text, "token_ids": list(range(len(text))), "finish_reason": "stop",
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(text),
                          "total_tokens": n_prompt + len(text)},
                "timings": {"prefill_s": 0.0, "time_to_first_token_s": 0.0, "decode_s": 0.0,
                            "decode_tokens_per_s": 0.0}}


def run(coro):
    return asyncio.run(coro)


# --- _call_transformers ---------------------------------------------------------------------------------

def test_call_transformers_passes_messages_as_dicts_and_config_params():
    mgr = FakeManager(texts={"m": "Once upon a time."})
    client = LLMClient(mgr)
    cfg = ClientModelConfig("m", max_tokens=64, temperature=0.3, top_p=0.8)
    assert run(client._call_transformers(cfg, MESSAGES)) == "Once upon a time."
    method, prompt, name, kwargs = mgr.calls[0]
    assert (method, name) == ("generate", "m")
    assert prompt == [{"role": "system", "content": "You are a calm narrator."},
                      {"role": "user", "content": "The lantern flickers."}]
    assert kwargs == {"max_tokens": 64, "temperature": 0.3, "top_p": 0.8}


def test_temperature_zero_is_passed_through_as_greedy():
    mgr = FakeManager()
    client = LLMClient(mgr)
    run(client._call_transformers(ClientModelConfig("m", temperature=0), MESSAGES))
    run(client.generate(GenerationRequest("hi", temperature=0.0), "m"))
    for _, _, _, kwargs in mgr.calls:
        assert "temperature" in kwargs and kwargs["temperature"] == 0 and kwargs["temperature"] is not None


def test_streaming_calls_back_with_deltas_and_returns_full_text():
    mgr = FakeManager(texts={"m": "The river sings over smooth stones."})
    client = LLMClient(mgr)
    got = []
    text = run(client._call_transformers(ClientModelConfig("m"), MESSAGES, stream=True, stream_callback=got.append))
    assert text == "The river sings over smooth stones." == "".join(got)
    assert len(got) > 1 and mgr.calls[0][0] == "generate_streaming"

    async def async_cb(delta):  # async callbacks work too
        got2.append(delta)

    got2: list[str] = []
    assert run(client._call_transformers(ClientModelConfig("m"), MESSAGES, True, async_cb)) == "".join(got2)


def test_stream_on_a_model_without_streaming_delivers_the_text_once():
    mgr = FakeManager(texts={"m": "whole"})
    got = []
    cfg = ClientModelConfig("m", supports_streaming=False)
    assert run(LLMClient(mgr)._call_transformers(cfg, MESSAGES, stream=True, stream_callback=got.append)) == "whole"
    assert got == ["whole"] and mgr.calls[0][0] == "generate"
    got.clear()
    run(LLMClient(mgr)._call_transformers(cfg, MESSAGES, stream=False, stream_callback=got.append))
    assert got == []


@pytest.mark.parametrize("stream", [False, True])
def test_timeout_raises_a_clear_timeout_error_and_cancels_decoding(stream):
    mgr = FakeManager(delay={"slow": 5.0})
    client = LLMClient(mgr)
    cfg = ClientModelConfig("slow", timeout=0.05)

    async def go():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(asyncio.TimeoutError) as ei:
            await client._call_transformers(cfg, MESSAGES, stream=stream, stream_callback=lambda d: None)
        return ei.value, loop.time() - t0

    err, elapsed = run(go())
    assert elapsed < 2.0
    assert isinstance(err, GenerationTimeoutError) and isinstance(err, TimeoutError)
    assert isinstance(err, TTAEngineError)
    assert "'slow'" in str(err) and "0.05 s" in str(err) and "timeout" in str(err)
    assert mgr.cancelled == ["slow"]


def test_no_timeout_when_none():
    mgr = FakeManager(delay={"m": 0.05})
    assert run(LLMClient(mgr)._call_transformers(ClientModelConfig("m", timeout=None), MESSAGES)) == "[m] reply"


def test_messages_conversion():
    assert messages_to_prompt("raw text") == "raw text"
    assert messages_to_prompt([{"role": "user", "content": "x"}, Message("assistant", "y")]) == [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    with pytest.raises(EmptyInputError):
        messages_to_prompt([])


# --- generate (provider interface) ----------------------------------------------------------------------

def test_generate_request_usage_stop_sequences_and_latency():
    mgr = FakeManager(texts={"m": "You breathe in. STOP You breathe out."})
    client = LLMClient(mgr)
    req = GenerationRequest("Breathe.", max_tokens=32, stop_sequences=("STOP", "END"), metadata={"req": 7})
    resp = run(client.generate(req, "m"))
    assert isinstance(resp, GenerationResponse)
    assert resp.text == "You breathe in. " and resp.model_id == "m"
    assert resp.usage == {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24}
    assert resp.latency_ms >= 0 and resp.metadata["finish_reason"] == "stop" and resp.metadata["req"] == 7
    method, prompt, _, kwargs = mgr.calls[0]
    assert method == "complete" and prompt == "Breathe."
    # None fields keep the model's defaults: they are not sent at all
    assert kwargs == {"max_tokens": 32, "stop": ["STOP", "END"]}


def test_generate_timeout():
    mgr = FakeManager(delay={"m": 5.0})
    with pytest.raises(TimeoutError, match="did not finish within"):
        run(LLMClient(mgr, default_timeout=0.05).generate(GenerationRequest("x"), "m"))
    with pytest.raises(TimeoutError):
        run(LLMClient(mgr).generate(GenerationRequest("x"), "m", timeout=0.05))


# --- call_with_fallback -------------------------------------------------------------------------------------

def test_call_with_fallback_uses_the_selected_model():
    cfgs = load_model_configs()
    mgr = FakeManager()
    resp = run(LLMClient(mgr).call_with_fallback("narrative_generation", MESSAGES, cfgs))
    assert resp.model_id == "phi-4-mini-instruct" and resp.text == "[phi-4-mini-instruct] reply"
    assert resp.metadata["fallback_chain"] == ["phi-4-mini-instruct", "gemma-3-1b-it", "smollm2-135m-instruct"]
    assert resp.metadata["attempts"] == [] and resp.usage["completion_tokens"] == len(resp.text)
    _, prompt, _, kwargs = mgr.calls[0]
    assert prompt == messages_to_prompt(MESSAGES)
    assert kwargs == {"max_tokens": 512, "temperature": 0.7, "top_p": 0.95}  # from the config


def test_call_with_fallback_falls_back_on_engine_errors():
    cfgs = load_model_configs()
    mgr = FakeManager(fail={"phi-4-mini-instruct": ModelNotAvailableError("phi weights not cached"),
                            "gemma-3-1b-it": OverloadedError("gemma queue full")})
    resp = run(LLMClient(mgr).call_with_fallback("narrative_generation", MESSAGES, cfgs, temperature=0))
    assert resp.model_id == "smollm2-135m-instruct"
    assert [a["model"] for a in resp.metadata["attempts"]] == ["phi-4-mini-instruct", "gemma-3-1b-it"]
    assert "phi weights not cached" in resp.metadata["attempts"][0]["error"]
    assert [c[2] for c in mgr.calls] == ["phi-4-mini-instruct", "gemma-3-1b-it", "smollm2-135m-instruct"]
    assert all(c[3]["temperature"] == 0 for c in mgr.calls)
    assert mgr.calls[2][3]["max_tokens"] == 256  # each model's own config


def test_call_with_fallback_on_timeout_and_streaming():
    cfgs = load_model_configs()
    mgr = FakeManager(delay={"gemma-3-1b-it": 5.0})
    got = []
    resp = run(LLMClient(mgr).call_with_fallback("narrative_generation", MESSAGES, cfgs, structured_output=False,
                                                 prefer="speed", stream=False, timeout=0.05))
    assert resp.model_id == "smollm2-135m-instruct"  # speed prefers smollm2
    mgr = FakeManager(fail={"phi-4-mini-instruct": OverloadedError("busy")}, delay={"gemma-3-1b-it": 5.0})
    resp = run(LLMClient(mgr).call_with_fallback("narrative_generation", MESSAGES, cfgs, stream=True,
                                                 stream_callback=got.append, timeout=0.05))
    # phi fails before streaming anything, gemma times out before its first chunk, smollm2 answers
    assert resp.model_id == "smollm2-135m-instruct" and "".join(got) == resp.text and resp.usage == {}
    assert "GenerationTimeoutError" in resp.metadata["attempts"][1]["error"]
    assert mgr.cancelled == ["gemma-3-1b-it"]


def test_no_fallback_after_part_of_a_stream_was_delivered():
    cfgs = load_model_configs()
    mgr = FakeManager(texts={"phi-4-mini-instruct": "a long story that takes a while"},
                      delay={"phi-4-mini-instruct": 0.02})
    got = []
    client = LLMClient(mgr)
    with pytest.raises(GenerationTimeoutError) as ei:
        run(client.call_with_fallback("narrative_generation", MESSAGES, cfgs, stream=True,
                                      stream_callback=got.append, timeout=0.07))
    assert got and len(mgr.calls) == 1
    assert any("not falling back" in n for n in getattr(ei.value, "__notes__", []))


def test_call_with_fallback_raises_the_last_error_when_all_fail():
    cfgs = load_model_configs()
    mgr = FakeManager(fail={"phi-4-mini-instruct": ModelNotAvailableError("no phi"),
                            "gemma-3-1b-it": ModelNotAvailableError("no gemma"),
                            "smollm2-135m-instruct": OverloadedError("smol busy")})
    with pytest.raises(OverloadedError, match="smol busy") as ei:
        run(LLMClient(mgr).call_with_fallback("knowledge_reasoning", MESSAGES, cfgs))
    notes = " ".join(getattr(ei.value, "__notes__", []))
    assert "no phi" in notes and "no gemma" in notes
    # tool_selection has no fallback: the one failure is raised as is
    mgr = FakeManager(fail={"phi-4-mini-instruct": ModelNotAvailableError("no phi")})
    with pytest.raises(ModelNotAvailableError):
        run(LLMClient(mgr).call_with_fallback("tool_selection", MESSAGES, cfgs))
    assert [c[2] for c in mgr.calls] == ["phi-4-mini-instruct"]


def test_caller_errors_and_other_exceptions_are_not_retried():
    cfgs = load_model_configs()
    for exc in (SamplingParamError("bad top_p"), EmptyInputError("empty"), RuntimeError("bug")):
        mgr = FakeManager(fail={"phi-4-mini-instruct": exc})
        with pytest.raises(type(exc)):
            run(LLMClient(mgr).call_with_fallback("narrative_generation", MESSAGES, cfgs))
        assert len(mgr.calls) == 1


def test_call_with_fallback_selection_inputs():
    cfgs = load_model_configs()
    # structured output excludes phi-4-mini-instruct; tool_selection excludes gemma
    mgr = FakeManager()
    resp = run(LLMClient(mgr).call_with_fallback("narrative_generation", MESSAGES, cfgs, structured_output=True))
    assert resp.model_id == "gemma-3-1b-it" and resp.metadata["fallback_chain"] == ["gemma-3-1b-it"]
    with pytest.raises(NoCapableModelError, match="tool_selection"):
        run(LLMClient(mgr).call_with_fallback("tool_selection", MESSAGES, cfgs, structured_output=True))
    # configs and stats default to the manager's
    two = {"a": {"model_type": "causal_lm", "source": {"kind": "local", "path": "/x"}, "task_mapping": {"chat": True}},
           "b": {"model_type": "causal_lm", "source": {"kind": "local", "path": "/x"}, "task_mapping": {"chat": True}}}
    mgr = FakeManager(model_configs=two, stats={"b": {"tokens_per_s": 40.0}, "a": {"tokens_per_s": 10.0}})
    resp = run(LLMClient(mgr).call_with_fallback("chat", "raw prompt"))
    assert resp.model_id == "b" and resp.metadata["fallback_chain"] == ["b", "a"]  # ranked extras follow
    assert mgr.calls[0][1] == "raw prompt"


# --- a real tiny model behind a minimal adapter --------------------------------------------------------

class LMAdapter:
    """The manager interface over one real LanguageModel (records the prompts it receives)."""

    def __init__(self, lm):
        self.lm, self.prompts, self.completions = lm, [], []

    async def complete(self, prompt, model_name, **kwargs):
        self.prompts.append(prompt)
        c = await self.lm.agenerate(prompt, **kwargs)
        self.completions.append(c)
        return c

    async def generate(self, prompt, model_name, **kwargs):
        return (await self.complete(prompt, model_name, **kwargs))["text"]

    async def generate_streaming(self, prompt, model_name, callback, **kwargs):
        self.prompts.append(prompt)
        return await self.lm.generate_streaming(prompt, callback, **kwargs)


def test_real_tiny_model_streams_full_greedy_text_with_chat_template(artifacts, tiny_configs):
    from tta_engine.runtime import open_artifact_lm

    # tiny-phi3: its random greedy reply is valid UTF-8 piece by piece, so it streams as many deltas
    # (tiny-llama's is a run of partial byte sequences, held back until the end as one delta)
    cfg = tiny_configs["tiny-phi3"]
    lm = open_artifact_lm(artifacts.get("tiny-phi3", "fp32"), cfg)
    try:
        adapter = LMAdapter(lm)
        client = LLMClient(adapter)
        mc = ClientModelConfig.from_model_config(cfg, timeout=60.0)
        assert mc.temperature == 0.0 and mc.max_tokens == 24

        plain = run(client._call_transformers(mc, MESSAGES))
        deltas: list[str] = []
        streamed = run(client._call_transformers(mc, MESSAGES, stream=True, stream_callback=deltas.append))
        assert plain and streamed == plain == "".join(deltas) and len(deltas) > 1

        # the chat template was applied: the prompt reached the model as messages, rendered by the template
        dicts = [{"role": m.role, "content": m.content} for m in MESSAGES]
        assert adapter.prompts == [dicts, dicts]
        ids = lm.encode_prompt(dicts)
        assert adapter.completions[0]["usage"]["prompt_tokens"] == len(ids)
        templated = lm.tokenizer.apply_chat_template(dicts, add_generation_prompt=True, tokenize=False)
        assert templated.startswith("<|im_start|>system\n") and templated.endswith("<|im_start|>assistant\n")
        assert ids == list(lm.tokenizer(templated, add_special_tokens=False)["input_ids"])

        # the provider interface on a raw string prompt: usage from the real Completion
        resp = run(client.generate(GenerationRequest("The lantern flickers.", max_tokens=8, temperature=0), "x"))
        n = len(lm.encode_prompt("The lantern flickers."))
        assert resp.usage["prompt_tokens"] == n
        assert resp.usage["total_tokens"] == n + resp.usage["completion_tokens"] <= n + 8
    finally:
        lm.close()
