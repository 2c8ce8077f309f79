"""``serve --ray`` (engine/server/ray_app.py, ray_proxy.py) on a local Ray cluster started here (127.0.0.1,
2 CPUs): the openai client against 2 replicas of the tiny model, session affinity (the replica id in the
``X-TTA-Replica`` header), a replica killed mid-stream (an error event ends the stream, Ray restarts it).
Skipped without the extra ``ray`` or where Ray cannot start."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import httpx
import openai
import pytest
from helpers import wait_until
from tta_engine.server.ray_proxy import session_key

ray = serve = None  # imported by the cluster fixture (the tests of the key and the hint run without Ray)

LM = "tiny-llama"
MSGS = [{"role": "system", "content": "You narrate a calm forest."},
        {"role": "user", "content": "The lantern flickers."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_ray_the_error_names_the_extra(monkeypatch):
    from tta_engine.errors import BackendUnavailableError
    from tta_engine.server.ray_app import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'tta-engine\[ray\]'"):
        require_ray()


@pytest.fixture(scope="module")
def cluster():
    global ray, serve
    ray = pytest.importorskip("ray", reason="needs the extra 'ray': pip install 'tta-engine[ray]'")
    serve = pytest.importorskip("ray.serve")
    from tta_engine.server.ray_app import PROXY_ENV

    os.environ.update(PROXY_ENV)  # the raylet passes it on to the proxy actors
    try:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - no shared memory, no ports, a sandbox: a reason, not a failure
        pytest.skip(f"Ray cannot start a local cluster here: {type(exc).__name__}: {exc}")
    yield
    serve.shutdown()
    ray.shutdown()
    for key in PROXY_ENV:
        os.environ.pop(key, None)


@pytest.fixture(scope="module")
def served(cluster, artifacts, tiny_configs):
    from tta_engine.server.ray_app import RaySettings, start

    artifacts.get(LM, "fp32")
    settings = RaySettings(configs={LM: tiny_configs[LM]}, artifacts_root=str(artifacts.root / "auto"),
                           replicas=2, threads=1, preload=(LM,), app_kwargs={"shutdown_grace_s": 5.0})
    port = _free_port()
    handle = start(settings, host="127.0.0.1", port=port)
    yield handle, f"http://127.0.0.1:{port}"


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _replica(client, key: str | None = None, **kw) -> str:
    headers = {"X-Session-Id": key} if key else {}
    raw = client.chat.completions.with_raw_response.create(model=LM, messages=kw.pop("messages", MSGS),
                                                           max_tokens=4, temperature=0, extra_headers=headers, **kw)
    raw.parse()
    return raw.headers["x-tta-replica"]


def test_session_key_header_user_then_prompt_prefix():
    body = {"messages": MSGS, "user": "player-7"}
    assert session_key(json.dumps(body).encode(), {"X-Session-Id": "s1"}) == "s1"
    assert session_key(json.dumps(body).encode()) == "user:player-7"
    turn1 = session_key({"messages": MSGS})
    turn2 = session_key({"messages": [*MSGS, {"role": "assistant", "content": "It dims."},
                                      {"role": "user", "content": "I wait."}]})
    assert turn1.startswith("prefix:") and turn2 == turn1
    assert session_key({"messages": MSGS}, n_chars=10) == session_key({"messages": MSGS[:1]}, n_chars=10)
    assert session_key({"messages": [{"role": "user", "content": "another story"}]}) != turn1
    assert session_key(b"not json") == "" and session_key({"prompt": "Once upon"}).startswith("prefix:")


def test_openai_client_stream_and_not_on_two_replicas(served, client):
    r = client.chat.completions.create(model=LM, messages=MSGS, temperature=0, max_tokens=12,
                                       extra_headers={"X-Session-Id": "same"})
    chunks = list(client.chat.completions.create(model=LM, messages=MSGS, temperature=0, max_tokens=12,
                                                 stream=True, extra_headers={"X-Session-Id": "same"}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert r.usage.completion_tokens > 0
    assert {m.id for m in client.models.list().data} == {LM}
    assert httpx.get(served[1] + "/health").json()["status"] == "ok"
    # both replicas serve: 16 keys spread over the ring
    assert len({_replica(client, f"player-{i}") for i in range(16)}) == 2


def test_affinity_one_conversation_one_replica(served, client):
    for player in ("ann", "bob", "cyd"):
        history, seen = list(MSGS), set()
        for turn in range(3):
            seen.add(_replica(client, player, messages=history))
            history += [{"role": "assistant", "content": f"reply {turn}"}, {"role": "user", "content": "next"}]
        assert len(seen) == 1, (player, seen)
    # no header: the user field, else the prompt's first characters, keep the conversation on one replica
    assert len({_replica(client, user="dee", messages=MSGS + [{"role": "user", "content": str(i)}])
                for i in range(4)}) == 1
    history = list(MSGS)
    seen = set()
    for i in range(4):  # the opening (system + first user message) is the key
        seen.add(_replica(client, messages=history))
        history += [{"role": "assistant", "content": f"reply {i}"}, {"role": "user", "content": str(i)}]
    assert len(seen) == 1
    openings = {_replica(client, messages=[{"role": "user", "content": f"story {i}"}]) for i in range(16)}
    assert len(openings) == 2  # different openings spread over the replicas


def _replica_states():
    app = serve.status().applications["tta-engine"]
    return app.deployments["tta-engine"].replica_states


def test_killed_replica_mid_stream_errors_then_recovers(served, client):
    handle, url = served
    key = "doomed"
    before = _replica(client, key)
    pid = handle.options(session_id=key).pid.remote().result(timeout_s=30)
    body = {"model": LM, "messages": MSGS, "stream": True, "max_tokens": 200, "min_tokens": 200, "temperature": 0}
    events, t0 = [], time.monotonic()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers={"X-Session-Id": key},
                      timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["x-tta-replica"] == before
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 2:
                os.kill(pid, signal.SIGKILL)
    assert time.monotonic() - t0 < 60, "the stream hung"
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert "error" in last, f"the stream finished before the kill took effect: {last}"
    assert last["error"]["code"] == "replica_died" and last["error"]["type"] == "server_error"
    assert len(events) < 150  # cut off, not complete
    # new requests succeed meanwhile (another replica on the ring) and Ray brings the replica back
    assert client.chat.completions.create(model=LM, messages=MSGS, max_tokens=4,
                                          extra_headers={"X-Session-Id": key}).choices[0].message.content is not None
    assert wait_until(lambda: _replica_states().get("RUNNING", 0) == 2, timeout=90), _replica_states()
    ids: set[str] = set()

    def two_live_replicas() -> bool:  # the proxy's router learns of the new replica by long poll
        ids.clear()
        ids.update(_replica(client, f"after-{i}") for i in range(16))
        return len(ids) == 2

    assert wait_until(two_live_replicas, timeout=60), ids
    assert before not in ids
