"""The server's edges on tiny models: work stops when the client goes (queued or running, streaming or
not), DNS-rebinding / cross-origin requests are refused, request caps (stop strings, embedding inputs,
the encoder's window, the embedding queue), status codes of an unload and of a bug, and prompt
rendering off the event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import httpx
import numpy as np
import pytest
from helpers import wait_until
from test_server import EMB, LM, MSGS, configs, live_server, make_manager  # noqa: F401 - configs: a fixture
from tta_engine.errors import ModelUnloadedError, OverloadedError
from tta_engine.server.errors import error_body
from tta_engine.server.hosts import HostPolicy, default_allowed_hosts


@pytest.fixture(scope="module")
def served(configs, artifacts):  # noqa: F811
    manager = make_manager(configs, artifacts, max_batch=1)  # one row: a second request waits in the queue
    with live_server(manager, preload=(LM, EMB)) as (server, url):
        yield manager, url


def _slow(monkeypatch, sched, seconds: float = 0.005):
    step = sched._step

    def slow_step():
        time.sleep(seconds)
        return step()

    monkeypatch.setattr(sched, "_step", slow_step)


def _chat(**kw) -> dict:
    return {"model": LM, "messages": MSGS, "temperature": 0, "max_tokens": 200, "min_tokens": 200, **kw}


# -- the client goes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_running_request_stops_decoding_when_its_client_goes(served, monkeypatch, stream):
    manager, url = served
    sched = manager._loaded[LM].scheduler
    _slow(monkeypatch, sched)
    seen = []

    def leave():  # non-streaming: no byte comes before the end; streaming: leave before reading a line
        with httpx.Client(base_url=url, timeout=httpx.Timeout(5, read=0.3)) as http:
            with pytest.raises(httpx.ReadTimeout):
                if stream:
                    with http.stream("POST", "/v1/chat/completions", json=_chat(stream=True)) as r:
                        seen.append(r.status_code)
                        for _ in r.iter_raw(1 << 20):
                            time.sleep(10)  # never reads on: the connection closes when the block exits
                else:
                    http.post("/v1/chat/completions", json=_chat())

    thread = threading.Thread(target=leave)
    thread.start()
    assert wait_until(lambda: len(sched.active) == 1, 10)
    req = sched.active[0]
    thread.join(30)
    if stream:  # the streaming client read its headers, then left without reading the body
        assert seen == [200]
    assert wait_until(lambda: req not in sched.active, 5), "the row kept decoding after its client left"
    assert req.state.finish_reason == "cancelled"
    assert len(req.state.tokens) < 200  # 200 tokens at >= 5 ms each take >= 1 s; the client left at 0.3 s


@pytest.mark.parametrize("stream", [False, True])
def test_queued_request_leaves_the_queue_when_its_client_goes(served, monkeypatch, stream):
    manager, url = served
    sched = manager._loaded[LM].scheduler
    _slow(monkeypatch, sched)

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            running = asyncio.create_task(http.post("/v1/chat/completions", json=_chat(max_tokens=120, min_tokens=120)))
            assert await asyncio.to_thread(wait_until, lambda: len(sched.active) == 1, 10)
            async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(5, read=0.3)) as other:
                with pytest.raises(httpx.ReadTimeout):  # queued behind the running one: no first token yet
                    await other.post("/v1/chat/completions", json=_chat(stream=stream))
            queued = list(sched.pending)
            return queued, await running

    queued, first = asyncio.run(main())
    assert first.status_code == 200
    # the queued request was cancelled when its client left, before the first request finished
    assert all(r.cancelled.is_set() for r in queued), "a request whose client left still waits for a row"
    assert wait_until(lambda: not sched.pending and not sched.active, 10)
    assert all(r.state.tokens == [] for r in queued)  # never decoded


# -- Host / Origin ------------------------------------------------------------------------------------
def test_default_hosts_follow_the_bind_address():
    assert set(default_allowed_hosts("127.0.0.1")) == {"localhost", "127.0.0.1", "::1"}
    assert default_allowed_hosts("0.0.0.0") == ("*",) and default_allowed_hosts("::") == ("*",)
    assert default_allowed_hosts("192.168.1.20")[0] == "192.168.1.20"
    p = HostPolicy(default_allowed_hosts("127.0.0.1"))
    assert p.host_ok("127.0.0.1:8000") and p.host_ok("localhost") and p.host_ok("[::1]:8000")
    assert not p.host_ok("evil.example:8000") and not p.host_ok(None) and not p.host_ok("127.0.0.1.evil.example")
    assert p.origin_ok(None, "127.0.0.1:8000") and p.origin_ok("http://localhost:3000", "127.0.0.1:8000")
    assert not p.origin_ok("https://evil.example", "127.0.0.1:8000") and not p.origin_ok("null", "127.0.0.1")


def test_forged_host_and_foreign_origin_are_refused(served):
    _, url = served
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.get("/v1/models", headers={"Host": "rebound.evil.example:8000"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
        r = http.post("/v1/chat/completions", json=_chat(max_tokens=2, min_tokens=0),
                      headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in r.headers
        r = http.get("/v1/models", headers={"Origin": "http://localhost:5173"})  # a page on this machine
        assert r.status_code == 200
        assert http.get("/health", headers={"Host": "evil.example"}).status_code == 403
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert http.get(path).status_code == 404, path


def test_allowed_origins_get_cors_and_docs_on_request(configs, artifacts):  # noqa: F811
    manager = make_manager(configs, artifacts)
    game = "https://game.example"
    with live_server(manager, allowed_origins=(game,), docs=True, allowed_hosts=("api.game.example",)) as (_, url):
        with httpx.Client(base_url=url, timeout=30) as http:
            host = {"Host": "api.game.example"}
            pre = http.options("/v1/chat/completions", headers={
                **host, "Origin": game, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,authorization"})
            assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == game
            r = http.get("/v1/models", headers={**host, "Origin": game})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == game
            assert http.get("/v1/models", headers={**host, "Origin": "https://other.example"}).status_code == 403
            assert http.get("/v1/models").status_code == 403  # 127.0.0.1 is not in the given --allowed-hosts
            assert http.get("/openapi.json", headers=host).status_code == 200


# -- caps ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], ["x" * 257], ["ok"] * 40000])
def test_stop_strings_are_capped(served, stop):
    _, url = served
    r = httpx.post(url + "/v1/chat/completions", json=_chat(max_tokens=2, min_tokens=0, stop=stop), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text


def test_four_bounded_stop_strings_are_accepted(served):
    _, url = served
    r = httpx.post(url + "/v1/chat/completions", timeout=30,
                   json=_chat(max_tokens=2, min_tokens=0, stop=["a", "b", "c", "x" * 256]))
    assert r.status_code == 200, r.text


def test_embeddings_cap_inputs_reject_over_window_texts_or_truncate(served):
    manager, url = served
    long = "calm lake " * 200  # far over the tiny encoder's 128-token window
    with httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/v1/embeddings", json={"model": EMB, "input": ["a"] * 2049})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
        r = http.post("/v1/embeddings", json={"model": EMB, "input": ["short", long]})
        assert r.status_code == 400 and "input[1]" in r.json()["error"]["message"], r.text
        assert "128-token window" in r.json()["error"]["message"]
        r = http.post("/v1/embeddings", json={"model": EMB, "input": ["short", long], "truncate": True})
        assert r.status_code == 200
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, manager.embed(["short", long], EMB), rtol=1e-5, atol=1e-6)
        assert r.json()["usage"]["prompt_tokens"] == len(manager._loaded[EMB].tokenizer.encode("short")) + 128


def test_embeddings_tokenize_each_text_once(served, monkeypatch):
    manager, url = served
    tok = manager._loaded[EMB].model.tokenizer
    calls = []
    real = tok.encode_batch
    monkeypatch.setattr(tok, "encode_batch", lambda texts, *a, **k: calls.append(list(texts)) or real(texts, *a, **k))
    texts = [f"unseen text number {i} at {time.time()}" for i in range(3)]
    r = httpx.post(url + "/v1/embeddings", json={"model": EMB, "input": texts}, timeout=60)
    assert r.status_code == 200
    assert calls == [texts]
    assert r.json()["usage"]["prompt_tokens"] == sum(len(ids) for ids in real(texts)["input_ids"])


def test_embedding_queue_is_bounded(configs, artifacts, monkeypatch):  # noqa: F811
    manager = make_manager(configs, artifacts)
    release = threading.Event()
    real = manager.embed_counted

    def blocked(*a, **k):
        release.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(manager, "embed_counted", blocked)
    with live_server(manager, max_embedding_requests=2) as (_, url):
        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                body = {"model": EMB, "input": "calm"}
                held = [asyncio.create_task(http.post("/v1/embeddings", json=body)) for _ in range(2)]
                await asyncio.sleep(0.5)
                over = await http.post("/v1/embeddings", json=body)
                release.set()
                return over, await asyncio.gather(*held)

        over, held = asyncio.run(main())
    assert over.status_code == 429 and "retry-after" in over.headers
    assert [r.status_code for r in held] == [200, 200]


# -- status codes -------------------------------------------------------------------------------------
def test_an_unload_is_503_not_429():
    r = error_body(ModelUnloadedError("model 'x' was unloaded before this request finished; retry the request"))
    assert r.status_code == 503 and json.loads(r.body)["error"]["code"] == "model_unloaded"
    assert error_body(OverloadedError("queue full")).status_code == 429


def test_a_bug_is_a_500_with_an_id_and_no_exception_text(caplog):
    with caplog.at_level(logging.ERROR, logger="tta_engine.server.errors"):
        r = error_body(RuntimeError("secret /home/player/save.db"))
    err = json.loads(r.body)["error"]
    assert r.status_code == 500 and "secret" not in err["message"] and "RuntimeError" not in err["message"]
    error_id = err["message"].split("(id ")[1].split(")")[0]
    assert any(error_id in rec.getMessage() and rec.exc_info for rec in caplog.records)


# -- the event loop -----------------------------------------------------------------------------------
@pytest.mark.e2e  # a model whose greedy text streams a delta per token (a tiny random model's bytes are held
def test_a_slow_prompt_render_does_not_stall_other_streams(default_artifacts, monkeypatch):  # back as UTF-8)
    """A prompt whose rendering and tokenizing take 0.5 s (a long one near the context limit) must not
    hold the event loop: the stream already running keeps its inter-token gaps under 100 ms."""
    from tta_engine.manager import TransformersModelManager

    root, cfgs, _ = default_artifacts
    name = "smollm2-135m-instruct"
    manager = TransformersModelManager(cfgs, artifacts_root=root)
    with live_server(manager, preload=(name,)) as (_, url):
        lm = manager._loaded[name].model
        real, on_loop = lm.encode_prompt, []

        def slow_encode(prompt, tools=None):
            if isinstance(prompt, list) and prompt[0]["content"] == "LONG":
                on_loop.append(asyncio._get_running_loop() is not None)
                time.sleep(0.5)
            return real(prompt, tools)

        monkeypatch.setattr(lm, "encode_prompt", slow_encode)

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                gaps, last, slow = [], None, None
                body = {"model": name, "messages": [{"role": "user", "content": "Describe a quiet forest."}],
                        "temperature": 0, "max_tokens": 80, "min_tokens": 80, "stream": True}
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or '"content"' not in line:
                            continue
                        now = time.perf_counter()
                        if slow is None:  # the stream runs: now send the slow prompt beside it
                            slow = asyncio.create_task(http.post("/v1/chat/completions", json={
                                "model": name, "messages": [{"role": "user", "content": "LONG"}], "max_tokens": 1}))
                        else:
                            gaps.append(now - last)
                        last = now
                return gaps, await slow

        gaps, slow = asyncio.run(main())
    assert slow.status_code == 200 and on_loop == [False]
    assert len(gaps) > 40 and max(gaps) < 0.1, (max(gaps), int(np.argmax(gaps)))
