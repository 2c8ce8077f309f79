"""The OpenAI-compatible server (engine/server) on tiny models, served by uvicorn in a thread on a free
loopback port: the official openai client, raw SSE, every error status, cancellation on disconnect,
64 concurrent streams and the graceful shutdown."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import tiny_cfg
from helpers import wait_until
from tta_engine.manager import TransformersModelManager
from tta_engine.server import build_server

MSGS = [{"role": "user", "content": "The lantern flickers in the forest."}]
LM, EMB = "tiny-llama", "tiny-bert"


@pytest.fixture(scope="module")
def configs(artifacts, tiny_configs):
    artifacts.get(LM, "fp32")
    artifacts.get(EMB, "fp32")
    cfgs = {LM: tiny_configs[LM], EMB: tiny_configs[EMB]}
    cfgs["tiny-missing"] = tiny_cfg("tiny-missing", Path("/nonexistent/tiny-missing"))
    return cfgs


def make_manager(configs, artifacts, **kw):
    return TransformersModelManager(configs, artifacts_root=artifacts.root / "auto", **kw)


@contextlib.contextmanager
def live_server(manager, **kw):
    """uvicorn in a thread on a free 127.0.0.1 port; yields (server, base_url)."""
    server = build_server(manager, "127.0.0.1", 0, log_level="warning", **kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "server did not start"
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def served(configs, artifacts):
    manager = make_manager(configs, artifacts)
    with live_server(manager, preload=(LM,), max_body_bytes=64 << 10) as (server, url):
        yield manager, url
    assert manager.loaded_models == []  # closed at shutdown


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


def in_process(manager, prompt, **kw) -> str:
    return asyncio.run(manager.generate(prompt, LM, **kw))


# -- the openai client ----------------------------------------------------------------------------------
def test_chat_greedy_equals_in_process_stream_and_not(served, client):
    manager, _ = served
    ref = in_process(manager, MSGS, temperature=0, max_tokens=20)
    r = client.chat.completions.create(model=LM, messages=MSGS, temperature=0, max_tokens=20)
    assert r.object == "chat.completion" and r.model == LM and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=LM, messages=MSGS, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_content_parts_and_developer_role_render_like_plain_messages(served, client):
    manager, _ = served
    msgs = [{"role": "system", "content": "Be calm."}, {"role": "user", "content": "Hello there."}]
    ref = in_process(manager, msgs, temperature=0, max_tokens=12)
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "calm."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hello there."}]}]
    r = client.chat.completions.create(model=LM, messages=parts, temperature=0, max_tokens=12)
    assert r.choices[0].message.content == ref


def test_seeded_sampling_and_stop_strings_over_http(served, client):
    manager, _ = served
    kw = dict(temperature=0.9, top_p=0.95, seed=11, max_tokens=20)
    ref = in_process(manager, MSGS, **kw)
    r = client.chat.completions.create(model=LM, messages=MSGS, **kw)
    assert r.choices[0].message.content == ref
    stop = ref[3:5]
    ref_stop = in_process(manager, MSGS, stop=[stop], **kw)
    r = client.chat.completions.create(model=LM, messages=MSGS, stop=stop, **kw)
    assert r.choices[0].message.content == ref_stop and stop not in ref_stop
    assert r.choices[0].finish_reason == "stop"


def test_min_tokens_extension_masks_eos_like_in_process(served, client):
    manager, _ = served
    ref = in_process(manager, MSGS, temperature=0.9, seed=5, max_tokens=30, min_new_tokens=30)
    r = client.chat.completions.create(model=LM, messages=MSGS, temperature=0.9, seed=5, max_tokens=30,
                                       extra_body={"min_tokens": 30})
    assert r.choices[0].message.content == ref and r.usage.completion_tokens == 30


def test_response_format_json_or_a_clear_400(served, client):
    import importlib.util

    schema = {"type": "object", "properties": {"mood": {"type": "string", "enum": ["calm", "tense"]}},
              "required": ["mood"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "mood", "schema": schema, "strict": True}}
    if importlib.util.find_spec("tta_engine.structured") is None:
        with pytest.raises(openai.BadRequestError) as ei:
            client.chat.completions.create(model=LM, messages=MSGS, max_tokens=40, response_format=fmt)
        assert ei.value.body["param"] == "response_format"
        return
    r = client.chat.completions.create(model=LM, messages=MSGS, max_tokens=40, temperature=0, response_format=fmt)
    assert json.loads(r.choices[0].message.content)["mood"] in ("calm", "tense")
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=LM, messages=MSGS, max_tokens=40,
                                       response_format={"type": "json_schema", "json_schema": {"schema": 5}})
    assert ei.value.body["param"] == "response_format"


def test_completions_stream_and_not(served, client):
    manager, _ = served
    ref = in_process(manager, "Once upon a time", temperature=0, max_tokens=10)
    r = client.completions.create(model=LM, prompt="Once upon a time", temperature=0, max_tokens=10)
    assert r.object == "text_completion" and r.choices[0].text == ref
    chunks = list(client.completions.create(model=LM, prompt="Once upon a time", temperature=0, max_tokens=10,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_embeddings_equal_in_process_float_and_base64(served, client):
    manager, _ = served
    texts = ["a calm lake at night", "I feel anxious", "你好 😀"]
    ref = manager.embed(texts, EMB)
    r = client.embeddings.create(model=EMB, input=texts)
    got = np.array([d.embedding for d in r.data])
    assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens > 0
    cos = np.sum(got * ref, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.all(np.abs(cos - 1) < 1e-6)
    raw = httpx.post(f"{served[1]}/v1/embeddings", json={"model": EMB, "input": texts[0],
                                                          "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, ref[0], atol=1e-7)
    r = client.embeddings.create(model=EMB, input="one", dimensions=64)  # the model's own dimension is fine
    assert len(r.data[0].embedding) == 64


def test_models_lists_configured_models_loaded_or_not(served, client):
    data = {m.id: m for m in client.models.list().data}
    assert set(data) == {LM, EMB, "tiny-missing"}
    assert data[LM].loaded is True and data["tiny-missing"].loaded is False
    assert data[EMB].type == "embedding" and data[LM].owned_by == "tta-engine"
    assert client.models.retrieve(LM).id == LM


def test_health_and_metrics(served, client):
    _, url = served
    client.chat.completions.create(model=LM, messages=MSGS, temperature=0, max_tokens=4)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    text = httpx.get(f"{url}/metrics").text
    assert 'tta_requests_total{route="/v1/chat/completions",status="200"}' in text
    for name in ("tta_tokens_total", "tta_time_to_first_token_seconds_count", "tta_decode_tokens_per_second_count",
                 "tta_queue_depth", "tta_active_rows", "tta_prefix_cache_hits_total"):
        assert f"{name}{{" in text, name
    assert f'tta_model_loaded{{model="{LM}"}} 1.0' in text
    assert 'tta_model_loaded{model="tiny-missing"} 0.0' in text


# -- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, status, param, code", [
    ({"model": "no-such-model"}, 404, "model", "model_not_found"),
    ({"n": 2}, 400, "n", None),
    ({"logit_bias": {"5": 3}}, 400, "logit_bias", None),
    ({"presence_penalty": 0.5}, 400, "presence_penalty", None),
    ({"frequency_penalty": 1.0}, 400, "frequency_penalty", None),
    ({"temperature": -1}, 400, "temperature", None),
    ({"top_p": 0}, 400, "top_p", None),
    ({"messages": []}, 400, None, None),
    ({"max_tokens": 10_000}, 400, "messages", "context_length_exceeded"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                                 "function": {"name": "g"}}},
     400, "tool_choice", None),
    ({"tool_choice": "required"}, 400, "tool_choice", None),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "response_format": {"type": "regex", "pattern": "a"}},
     400, "response_format", None),
    ({"messages": [{"role": "tool", "content": "4", "tool_call_id": "call_x"}]}, 400, "messages[0].tool_call_id",
     None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content", None),
    ({"model": "tiny-missing"}, 503, None, "model_unavailable"),
    ({"model": EMB}, 400, None, None),
])
def test_chat_errors_in_openai_shape(served, change, status, param, code):
    body = {"model": LM, "messages": MSGS, "max_tokens": 4} | change
    for stream in (False, True):
        r = httpx.post(f"{served[1]}/v1/chat/completions", json=body | {"stream": stream}, timeout=60)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["param"] == param or param is None
        assert code is None or err["code"] == code


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSGS)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=LM, messages=MSGS, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=EMB, input="x", dimensions=32)


def test_raw_errors_malformed_json_validation_size_and_routes(served):
    url = served[1]
    post = lambda body, **kw: httpx.post(f"{url}/v1/chat/completions", content=body,  # noqa: E731
                                         headers={"Content-Type": "application/json"}, **kw)
    r = post(b'{"model": "tiny-llama", "messages": [')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = post(b'["not", "an", "object"]')
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = post(json.dumps({"model": LM, "messages": "not a list"}).encode())
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(json.dumps({"model": LM, "messages": MSGS, "temperature": "hot"}).encode())
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = post(json.dumps({"model": LM, "messages": MSGS, "padding": "x" * (70 << 10)}).encode())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(80):
            yield b" " * 1024

    r = httpx.post(f"{url}/v1/chat/completions", content=chunked())
    assert r.status_code == 413
    r = httpx.post(f"{url}/v1/completions", json={"model": LM, "prompt": ["a", "b"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{url}/v1/embeddings", json={"model": EMB, "input": []})
    assert r.status_code == 400
    r = httpx.get(f"{url}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(f"{url}/health").status_code == 200  # and the server keeps serving


def test_api_key(configs, artifacts):
    manager = make_manager(configs, artifacts)
    with live_server(manager, api_key="s3cret") as (_, url):
        assert httpx.get(f"{url}/health").status_code == 200  # /health needs no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(f"{url}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(f"{url}/metrics", headers=headers).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=LM, messages=MSGS, max_tokens=3).choices[0].message.content is not None


def test_full_queue_answers_429_with_retry_after(configs, artifacts):
    manager = make_manager(configs, artifacts, max_batch=1, max_queue=1)

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            body = {"model": LM, "messages": MSGS, "max_tokens": 200, "temperature": 0}
            started = asyncio.Event()

            async def first():  # running for sure (its first chunk came) before the others arrive
                async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                    async for _ in r.aiter_lines():
                        started.set()
                    started.set()
                    return r

            head = asyncio.create_task(first())
            await asyncio.wait_for(started.wait(), 60)
            rest = await asyncio.gather(*[http.post("/v1/chat/completions", json=body) for _ in range(5)])
            return [await head, *rest]

    with live_server(manager, preload=(LM,)) as (_, url):
        rs = asyncio.run(main(url))
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 2 and 429 in codes, codes
        busy = next(r for r in rs if r.status_code == 429)
        assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"


# -- raw SSE --------------------------------------------------------------------------------------------
def read_sse(raw: bytes) -> list[str]:
    """Events of a text/event-stream body; each must be exactly one ``data:`` line of valid UTF-8."""
    assert raw.endswith(b"\n\n")
    events = []
    for block in raw[:-2].split(b"\n\n"):
        line = block.decode("utf-8")  # strict: a split multi-byte character raises here
        assert line.startswith("data: ") and "\n" not in line, line
        events.append(line[len("data: "):])
    return events


def test_raw_sse_events_and_utf8_deltas(served):
    manager, url = served
    found = False
    for seed in range(12):  # a seed whose reply holds multi-byte characters (byte-level tokenizer: split tokens)
        kw = dict(temperature=1.0, seed=seed, max_tokens=24)
        ref = in_process(manager, MSGS, **kw)
        if any(ord(ch) > 127 and ch != "\ufffd" for ch in ref):
            found = True
            break
    assert found, "no seed gave a multi-byte reply: the test would prove nothing"
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"model": LM, "messages": MSGS, "stream": True,
                                                                   **kw}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw())
    events = read_sse(raw)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and deltas[-1] is None
    assert "".join(d for d in deltas if d) == ref
    # every delta is whole text: no replacement character that the full reply does not have
    assert sum(d.count("\ufffd") for d in deltas if d) == ref.count("\ufffd")
    assert len({c["id"] for c in chunks}) == 1


# -- cancellation and concurrency -----------------------------------------------------------------------
def test_disconnect_drops_the_row_and_the_others_continue(served, monkeypatch):
    manager, url = served
    sched = manager._loaded[LM].scheduler
    step = sched._step

    def slow_step():  # 5 ms per decode step, so that the streams overlap on a fast machine too
        time.sleep(0.005)
        return step()

    monkeypatch.setattr(sched, "_step", slow_step)
    kws = [dict(temperature=0.8, seed=100 + i, max_tokens=200) for i in range(4)]
    refs = [in_process(manager, MSGS, **kw) for kw in kws]

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async def stream(kw, leave: bool):
                deltas = []
                async with http.stream("POST", "/v1/chat/completions",
                                       json={"model": LM, "messages": MSGS, "stream": True, **kw}) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        d = json.loads(line[6:])["choices"][0]["delta"].get("content")
                        deltas.append(d or "")
                        if leave and len(deltas) == 3:
                            return len(sched.active)  # leaving the block closes the connection mid-stream
                return "".join(deltas)

            others = [asyncio.create_task(stream(kw, False)) for kw in kws[1:]]
            assert await asyncio.to_thread(wait_until, lambda: len(sched.active) == 3)
            rows_before = await stream(kws[0], True)
            seeds = lambda: sorted(r.params.seed for r in list(sched.active))  # noqa: E731
            dropped = await asyncio.to_thread(wait_until, lambda: 100 not in seeds(), 10)
            running = seeds() == [101, 102, 103]
            texts = await asyncio.gather(*others)
            return rows_before, dropped, running, texts

    rows_before, dropped, running, texts = asyncio.run(main())
    assert rows_before == 4 and dropped and running  # the row went while the others were still decoding
    assert texts == refs[1:]


def test_64_streams_16_disconnect_the_others_equal_solo_runs(served):
    manager, url = served
    n, leavers = 64, set(range(0, 64, 4))
    kws = [dict(temperature=0.8, seed=i, max_tokens=24 if i not in leavers else 200) for i in range(n)]
    solo = {i: in_process(manager, MSGS, **kws[i]) for i in range(n) if i not in leavers}
    cancelled_before = manager.stats()[LM]["cancelled"]

    async def main():
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            async def one(i):
                deltas = []
                async with http.stream("POST", "/v1/chat/completions",
                                       json={"model": LM, "messages": MSGS, "stream": True, **kws[i]}) as r:
                    assert r.status_code == 200, await r.aread()
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            return "".join(deltas)
                        if line.startswith("data: "):
                            deltas.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
                            if i in leavers and len(deltas) == 4:
                                return None
                raise AssertionError(f"stream {i} ended without [DONE]")

            return await asyncio.gather(*[one(i) for i in range(n)])

    got = asyncio.run(main())
    assert {i: got[i] for i in solo} == solo
    assert wait_until(lambda: manager.stats()[LM]["cancelled"] - cancelled_before >= len(leavers))
    assert wait_until(lambda: len(manager._loaded[LM].scheduler.active) == 0)
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": LM, "messages": MSGS, "max_tokens": 5,
                                                        "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == in_process(
        manager, MSGS, max_tokens=5, temperature=0)


# -- graceful shutdown ----------------------------------------------------------------------------------
def test_sigterm_drains_then_stops_streams_with_an_error_event(configs, artifacts, monkeypatch):
    from tta_engine.scheduler import BatchScheduler

    step = BatchScheduler._step

    def slow_step(self):  # 20 ms per decode step: a 200-token reply outlives the grace period
        time.sleep(0.02)
        return step(self)

    monkeypatch.setattr(BatchScheduler, "_step", slow_step)
    manager = make_manager(configs, artifacts)
    server = build_server(manager, "127.0.0.1", 0, log_level="warning", shutdown_grace_s=1.0, preload=(LM,))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, 30)

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async def stream(max_tokens):
                events = []
                async with http.stream("POST", "/v1/chat/completions", json={
                        "model": LM, "messages": MSGS, "stream": True, "max_tokens": max_tokens, "temperature": 0,
                        "min_tokens": max_tokens if max_tokens == 200 else 0}) as r:  # no early EOS
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            if len(events) == 2 and max_tokens == 200:
                                started.set()
                return events

            started = asyncio.Event()
            long = asyncio.create_task(stream(200))
            await started.wait()
            short = asyncio.create_task(stream(20))
            await asyncio.sleep(0.2)
            server.handle_exit(signal.SIGTERM, None)  # what uvicorn's SIGTERM handler calls
            await asyncio.sleep(0.3)
            assert manager.loaded_models == [LM]  # still serving the running streams
            async with httpx.AsyncClient(base_url=url, timeout=5) as fresh:  # but accepts no new connection
                with pytest.raises(httpx.ConnectError):
                    await fresh.get("/v1/models")
            return await long, await short

    t0 = time.monotonic()
    long, short = asyncio.run(main())
    thread.join(30)
    assert not thread.is_alive() and time.monotonic() - t0 < 15
    sock.close()
    assert short[-1] == "[DONE]" and json.loads(short[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    assert long[-1] == "[DONE]", long[-3:]
    err = json.loads(long[-2])["error"]
    assert err["code"] == "server_shutting_down" and err["type"] == "server_error"
    assert manager.loaded_models == []  # manager.close() ran after the streams
