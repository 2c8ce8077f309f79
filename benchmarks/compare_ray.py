"""Ray Serve benchmarks (issue 22): ``tta-engine serve --ray`` against the plain ``tta-engine serve``, both
as subprocesses on this machine, the same artifact (default: SmolLM2 int4), measured in one run.

1. the Ray hop: the same 1-token request (non-streaming) to the plain server and to Ray with 1 replica of the
   same threads, interleaved; p50 / p99 of each and of the paired difference        (target <= 3 ms p50)
2. 8 concurrent streaming clients: aggregate tok/s and TTFT p50 / p99, plain server (one process, all
   cores) vs Ray with --replicas 2 (cores split between them)
3. session affinity, Ray with 2 replicas: conversations of two turns; turn 2 (turn 1's prompt + reply + a
   new message) with the conversation's ``X-Session-Id`` (affinity) vs a fresh id per request (what a
   round-robin router does); the miss rate (turn 2 on another replica than turn 1, read from the
   ``X-TTA-Replica`` header) and turn 2's TTFT p50 for both

    python benchmarks/compare_ray.py [--model smollm2-135m-instruct] [--artifacts DIR] [--reps 60]
        [--conversations 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
from bench import machine_info
from compare_server import free_port, messages, pct, sse_chunks, start, stop
from tta_engine.config import load_model_configs

SYSTEM = ("You are the gentle narrator of a calming text adventure. The player walks through a quiet valley "
          "with a lantern, a map and a small dog. Describe sounds, light and weather softly; never rush the "
          "player; offer two gentle choices at the end of each reply. ") * 4


def serve_cmd(model: str, port: int, artifacts: Path, threads: int, ray_replicas: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "tta_engine.cli", "serve", "--port", str(port), "--models", model,
           "--threads", str(threads)]
    cmd += ["--artifacts", str(artifacts.resolve()), "--backend", "onnx"]  # no silent fallback to PyTorch
    if ray_replicas:
        cmd += ["--ray", "--replicas", str(ray_replicas)]
    return cmd


def wait_replicas(url: str, model: str, replicas: int, timeout: float = 300) -> None:
    """Until ``replicas`` distinct replicas have answered /health with the model loaded."""
    seen, deadline = set(), time.monotonic() + timeout
    while len(seen) < replicas:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(seen)} of {replicas} replicas became ready in {timeout:.0f}s")
        try:
            r = httpx.get(url + "/health", headers={"X-Session-Id": uuid.uuid4().hex}, timeout=5)
            if r.status_code == 200 and model in r.json()["loaded_models"]:
                seen.add(r.headers.get("x-tta-replica", "plain"))
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def start_server(cmd: list[str], url: str, model: str, replicas: int) -> subprocess.Popen:
    proc = start(cmd, url + "/health", lambda r: r.status_code == 200 and model in r.json()["loaded_models"],
                 timeout=600)
    wait_replicas(url, model, replicas)
    return proc


# -- 1. the hop --------------------------------------------------------------------------------------------
async def hop(plain: str, ray: str, model: str, reps: int) -> dict:
    body = {"model": model, "messages": messages(0), "max_tokens": 1, "temperature": 0}
    times: dict[str, list[float]] = {"plain": [], "ray": []}
    async with httpx.AsyncClient(timeout=60) as http:
        for _ in range(5):  # warm-up: the prompt's KV becomes resident on both
            for url in (plain, ray):
                (await http.post(url + "/v1/chat/completions", json=body)).raise_for_status()
        for i in range(reps):
            order = ("plain", "ray") if i % 2 == 0 else ("ray", "plain")
            for name in order:
                url = plain if name == "plain" else ray
                t0 = time.perf_counter()
                (await http.post(url + "/v1/chat/completions", json=body)).raise_for_status()
                times[name].append(time.perf_counter() - t0)
    diff = [r - p for r, p in zip(times["ray"], times["plain"], strict=True)]
    ms = 1000.0
    return {"plain_p50_ms": ms * pct(times["plain"], 50), "plain_p99_ms": ms * pct(times["plain"], 99),
            "ray_p50_ms": ms * pct(times["ray"], 50), "ray_p99_ms": ms * pct(times["ray"], 99),
            "hop_p50_ms": ms * statistics.median(diff), "hop_p99_ms": ms * pct(diff, 99), "n": reps}


# -- 2. eight clients --------------------------------------------------------------------------------------
async def stream(http: httpx.AsyncClient, url: str, body: dict, headers: dict) -> tuple[float, int, str, str]:
    """(TTFT, completion tokens, text, replica) of one streaming chat request."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    t0, ttft, n, text = time.perf_counter(), None, 0, []
    async with http.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        replica = r.headers.get("x-tta-replica", "plain")
        async for chunk in sse_chunks(r):
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                text.append(chunk["choices"][0]["delta"]["content"])
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return (ttft if ttft is not None else time.perf_counter() - t0), n, "".join(text), replica


async def clients8(url: str, model: str, tokens: int, rounds: int) -> dict:
    tps, ttfts = [], []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=8)) as http:
        for r in range(rounds + 1):
            t0 = time.perf_counter()
            res = await asyncio.gather(*[
                stream(http, url, {"model": model, "messages": messages(i), "max_tokens": tokens,
                                   "min_tokens": tokens, "temperature": 0}, {"X-Session-Id": f"c{r}-{i}"})
                for i in range(8)])
            if r:  # round 0 warms up
                tps.append(sum(n for _, n, _, _ in res) / (time.perf_counter() - t0))
                ttfts += [t for t, _, _, _ in res]
    return {"tok_s": statistics.median(tps), "ttft_p50_ms": 1000 * pct(ttfts, 50),
            "ttft_p99_ms": 1000 * pct(ttfts, 99)}


# -- 3. affinity -------------------------------------------------------------------------------------------
async def two_turns(http, url: str, model: str, conv: int, affinity: bool) -> tuple[float, bool]:
    """(turn 2's TTFT, whether turn 2 ran on another replica than turn 1)."""
    key = f"conv-{conv}-{uuid.uuid4().hex[:6]}"
    msgs = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"I open the gate number {conv} and step into the valley."}]
    body = {"model": model, "messages": msgs, "max_tokens": 24, "temperature": 0}
    _, _, reply, first = await stream(http, url, body, {"X-Session-Id": key})
    msgs = [*msgs, {"role": "assistant", "content": reply}, {"role": "user", "content": "I follow the dog."}]
    body = {"model": model, "messages": msgs, "max_tokens": 4, "temperature": 0}
    ttft, _, _, second = await stream(http, url, body, {"X-Session-Id": key if affinity else uuid.uuid4().hex})
    return ttft, first != second


async def affinity(url: str, model: str, conversations: int) -> dict:
    out = {}
    async with httpx.AsyncClient(timeout=600) as http:
        for mode in (True, False, True, False):  # alternated against drift
            res = [await two_turns(http, url, model, c, mode) for c in range(conversations // 2)]
            row = out.setdefault("affinity" if mode else "random", {"ttft": [], "miss": []})
            row["ttft"] += [t for t, _ in res]
            row["miss"] += [m for _, m in res]
    return {k: {"turn2_ttft_p50_ms": 1000 * statistics.median(v["ttft"]),
                "miss_rate": sum(v["miss"]) / len(v["miss"]), "n": len(v["miss"])} for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--artifacts", type=Path, default=Path(__file__).resolve().parents[1] / "artifacts",
                    help="artifacts root (default: the checkout's artifacts/, whatever the working directory)")
    ap.add_argument("--reps", type=int, default=60, help="paired requests for the hop")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per stream at 8 clients")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conversations", type=int, default=16, help="two-turn conversations per mode")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    cfg = load_model_configs()[args.model]
    cores = os.cpu_count() or 2
    machine = machine_info()
    print(f"{machine['cpu']} ({', '.join(machine['isa'])}), {cores} CPUs; model {cfg.name} ({cfg.precision}); "
          "servers and clients share this machine", flush=True)
    out: dict = {"model": cfg.name, "precision": cfg.precision, "cpu": machine["cpu"], "isa": machine["isa"]}
    half = max(1, cores // 2)

    print(f"\n1. the Ray hop: plain serve vs serve --ray --replicas 1, {half} thread(s) each, 1 new token, "
          f"{args.reps} paired requests", flush=True)
    pport, rport = free_port(), free_port()
    plain_url, ray_url = f"http://127.0.0.1:{pport}", f"http://127.0.0.1:{rport}"
    plain = start_server(serve_cmd(cfg.name, pport, args.artifacts, half, None), plain_url, cfg.name, 1)
    try:
        ray = start_server(serve_cmd(cfg.name, rport, args.artifacts, half, 1), ray_url, cfg.name, 1)
        try:
            out["hop"] = asyncio.run(hop(plain_url, ray_url, cfg.name, args.reps))
        finally:
            stop(ray)
    finally:
        stop(plain)
    h = out["hop"]
    print(f"   plain p50 {h['plain_p50_ms']:.2f} p99 {h['plain_p99_ms']:.2f} ms | Ray p50 {h['ray_p50_ms']:.2f} "
          f"p99 {h['ray_p99_ms']:.2f} ms | hop (paired) p50 {h['hop_p50_ms']:.2f} p99 {h['hop_p99_ms']:.2f} ms "
          "(target p50 <= 3 ms)", flush=True)

    print(f"\n2. 8 streaming clients, {args.tokens} tokens each: plain serve ({cores} threads) vs "
          f"serve --ray --replicas 2 ({half} thread(s) each)", flush=True)
    plain = start_server(serve_cmd(cfg.name, pport, args.artifacts, cores, None), plain_url, cfg.name, 1)
    try:
        out["clients8_plain"] = asyncio.run(clients8(plain_url, cfg.name, args.tokens, args.rounds))
    finally:
        stop(plain)
    ray = start_server(serve_cmd(cfg.name, rport, args.artifacts, half, 2), ray_url, cfg.name, 2)
    try:
        out["clients8_ray"] = asyncio.run(clients8(ray_url, cfg.name, args.tokens, args.rounds))
        for name in ("plain", "ray"):
            r = out[f"clients8_{name}"]
            print(f"   {name:5s}: {r['tok_s']:6.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:7.1f} p99 "
                  f"{r['ttft_p99_ms']:7.1f} ms", flush=True)

        print(f"\n3. session affinity (2 replicas): {args.conversations} two-turn conversations per mode, "
              f"a {len(SYSTEM)}-character system prompt", flush=True)
        out["affinity"] = asyncio.run(affinity(ray_url, cfg.name, args.conversations))
        for mode, r in out["affinity"].items():
            label = "X-Session-Id per conversation" if mode == "affinity" else "a fresh id per request"
            print(f"   {label:30s}: turn-2 TTFT p50 {r['turn2_ttft_p50_ms']:6.1f} ms, other replica "
                  f"{100 * r['miss_rate']:5.1f}% ({r['n']} conversations)", flush=True)
    finally:
        stop(ray)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
