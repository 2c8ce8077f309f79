"""Server benchmarks (issue 12): the OpenAI-compatible server against the in-process manager and against
llama-cpp-python's server, measured in one run on one artifact (default: SmolLM2 int4).

1. aggregate decode tokens/s, 8 concurrent streams: over HTTP (SSE) / in-process manager  (target >= 0.95)
2. p50 / p99 time to first token over HTTP at 1, 8, 32 concurrent clients (in-process beside it)
3. server overhead per request: HTTP round trip - in-process call, p50 (1 new token)      (target <= 2 ms)
4. aggregate tokens/s at 8 clients: tta-engine serve / python -m llama_cpp.server, same GGUF, same
   prompts (target >= 2x); skipped with a note when llama-cpp-python[server] is missing.

The server runs as a subprocess (``tta-engine serve``), the clients are httpx.AsyncClient streams in this
process, like the game talking to it. Phases alternate between HTTP and in-process runs so that load from
other processes on the machine hits both alike.

    python benchmarks/compare_server.py [--tokens 128] [--rounds 3] [--json out.json]
        [--llama-python /path/to/python-with-llama-cpp-server]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tta_engine.config import load_model_configs
from tta_engine.manager import TransformersModelManager

TOPICS = ["a quiet lake", "the old mill", "a lantern-lit village", "the misty marsh", "a mountain path",
          "a cup of tea", "a sleeping cat", "falling snow"]


def messages(i: int) -> list[dict]:
    return [{"role": "system", "content": "You are the gentle narrator of a calming text adventure."},
            {"role": "user", "content": f"Tell me a short calming story about {TOPICS[i % len(TOPICS)]} (#{i})."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, ready, timeout: float = 300) -> subprocess.Popen:
    # stderr to a file, not a pipe nobody reads: llama.cpp logs ~100 KB at load and blocks on a full pipe
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{cmd[:4]} exited: {log.read()[-2000:]}")
        try:
            if ready(httpx.get(url, timeout=2)):
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not become ready in {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


# -- clients ------------------------------------------------------------------------------------------------
async def sse_chunks(response: httpx.Response):
    """The JSON chunks of an OpenAI SSE stream, up to ``[DONE]``."""
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


async def http_stream(http: httpx.AsyncClient, model: str, i: int, tokens: int, fixed: bool) -> tuple[float, int]:
    """One streaming chat request: (seconds to the first content delta, completion tokens)."""
    body = {"model": model, "messages": messages(i), "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if fixed:
        body["min_tokens"] = tokens
    t0, ttft, n, deltas = time.perf_counter(), None, 0, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for chunk in sse_chunks(r):
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                deltas += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    # llama_cpp.server sends no usage when streaming: there, one content delta is one token
    return (ttft if ttft is not None else time.perf_counter() - t0), n or deltas


async def http_round(url: str, model: str, clients: int, tokens: int, fixed: bool = True):
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        t0 = time.perf_counter()
        res = await asyncio.gather(*[http_stream(http, model, i, tokens, fixed) for i in range(clients)])
        dt = time.perf_counter() - t0
    return sum(n for _, n in res) / dt, [t for t, _ in res]


async def local_throughput(m, model, clients, tokens) -> tuple[float, list[float]]:
    from tta_engine.generator import GenerationState

    states = [GenerationState(0) for _ in range(clients)]
    ttfts: list[float] = [0.0] * clients

    async def one(i):
        t0 = time.perf_counter()
        async for _ in m.astream(messages(i), model, state=states[i], max_tokens=tokens, min_new_tokens=tokens,
                                 temperature=0):
            if not ttfts[i]:
                ttfts[i] = time.perf_counter() - t0

    t0 = time.perf_counter()
    await asyncio.gather(*[one(i) for i in range(clients)])
    dt = time.perf_counter() - t0
    return sum(len(s.tokens) for s in states) / dt, ttfts


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def overhead(url: str, m, model: str, reps: int) -> dict:
    """Paired: the same 1-token request in-process and over HTTP (non-streaming), interleaved."""
    body = {"model": model, "messages": messages(0), "max_tokens": 1, "temperature": 0}
    local, remote = [], []
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for _ in range(3):  # warm-up: the prompt's KV becomes resident on both sides
            await m.complete(messages(0), model, max_tokens=1, temperature=0)
            (await http.post("/v1/chat/completions", json=body)).raise_for_status()
        for _ in range(reps):
            t0 = time.perf_counter()
            await m.complete(messages(0), model, max_tokens=1, temperature=0)
            local.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            (await http.post("/v1/chat/completions", json=body)).raise_for_status()
            remote.append(time.perf_counter() - t0)
    return {"in_process_p50_ms": 1000 * statistics.median(local), "http_p50_ms": 1000 * statistics.median(remote),
            "overhead_p50_ms": 1000 * (statistics.median(remote) - statistics.median(local))}


def llama_python(arg: str | None) -> str | None:
    for cand in [arg, sys.executable]:
        if cand and subprocess.run([cand, "-c", "import llama_cpp.server"], capture_output=True).returncode == 0:
            return cand
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--artifacts", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per stream (throughput)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--overhead-reps", type=int, default=40)
    ap.add_argument("--ttft-requests", type=int, default=64, help="requests per client count (at least one round)")
    ap.add_argument("--llama-python", default=os.environ.get("LLAMA_CPP_PYTHON"),
                    help="a python with llama-cpp-python[server] installed (default: this one)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only-llama-cpp", action="store_true", help="part 4 only (the two servers side by side)")
    args = ap.parse_args()

    cfgs = load_model_configs()
    cfg = cfgs[args.model]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; model {cfg.name} "
          f"({cfg.precision}); other processes share this machine", flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tta_engine.cli", "serve", "--port", str(port), "--models", cfg.name]
    if args.artifacts:
        cmd += ["--artifacts", str(args.artifacts)]
    out: dict = {"model": cfg.name, "precision": cfg.precision, "tokens": args.tokens}
    if not args.only_llama_cpp:
        in_process_and_http(args, cfg, cmd, url, out)
    llama_cpp_comparison(args, cfg, cmd, url, out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


def in_process_and_http(args, cfg, cmd, url, out) -> None:
    """Parts 1-3: the server against the in-process manager, phases alternated."""
    m = TransformersModelManager(load_model_configs(), artifacts_root=args.artifacts)
    m.load_model(cfg.name)
    server = start(cmd, url + "/health", lambda r: r.status_code == 200 and cfg.name in r.json()["loaded_models"])
    try:
        asyncio.run(http_round(url, cfg.name, 2, 8))  # warm-up both sides
        asyncio.run(local_throughput(m, cfg.name, 2, 8))
        print(f"\n1. aggregate tok/s, 8 streams, {args.tokens} tokens each (median of {args.rounds} rounds)")
        h, loc = [], []
        for _ in range(args.rounds):
            h.append(asyncio.run(http_round(url, cfg.name, 8, args.tokens))[0])
            loc.append(asyncio.run(local_throughput(m, cfg.name, 8, args.tokens))[0])
        out["throughput_8"] = {"http": statistics.median(h), "in_process": statistics.median(loc)}
        out["throughput_8"]["ratio"] = out["throughput_8"]["http"] / out["throughput_8"]["in_process"]
        print("   HTTP {http:.1f}  in-process {in_process:.1f}  ratio {ratio:.3f} (target >= 0.95)".format(
            **out["throughput_8"]), flush=True)

        print("\n2. time to first token, streams of 32 tokens (ms)")
        out["ttft"] = {}
        for clients in (1, 8, 32):
            reps = max(1, args.ttft_requests // clients)
            ht, lt = [], []
            for _ in range(reps):
                ht += asyncio.run(http_round(url, cfg.name, clients, 32))[1]
                lt += asyncio.run(local_throughput(m, cfg.name, clients, 32))[1]
            row = {"http_p50_ms": 1000 * pct(ht, 50), "http_p99_ms": 1000 * pct(ht, 99),
                   "in_process_p50_ms": 1000 * pct(lt, 50), "in_process_p99_ms": 1000 * pct(lt, 99), "n": len(ht)}
            out["ttft"][clients] = row
            print(f"   {clients:2d} clients: HTTP p50 {row['http_p50_ms']:7.1f} p99 {row['http_p99_ms']:7.1f} | "
                  f"in-process p50 {row['in_process_p50_ms']:7.1f} p99 {row['in_process_p99_ms']:7.1f}  "
                  f"({row['n']} requests)", flush=True)

        print(f"\n3. overhead per request, 1 new token, {args.overhead_reps} paired requests")
        out["overhead"] = asyncio.run(overhead(url, m, cfg.name, args.overhead_reps))
        print("   in-process p50 {in_process_p50_ms:.2f} ms, HTTP p50 {http_p50_ms:.2f} ms, overhead "
              "{overhead_p50_ms:.2f} ms (target <= 2 ms)".format(**out["overhead"]), flush=True)
    finally:
        stop(server)
    m.close()


def llama_cpp_comparison(args, cfg, cmd, url, out) -> None:
    """Part 4: tta-engine serve against python -m llama_cpp.server on the same GGUF, same clients."""
    print("\n4. vs llama-cpp-python's server, 8 clients")
    py = llama_python(args.llama_python)
    from tta_engine.sources import resolve_source

    src = resolve_source(cfg)
    if py is None or not src.gguf_file:
        note = ("llama-cpp-python[server] is not installed (pip install 'llama-cpp-python[server]', or "
                "--llama-python PATH)" if py is None else "the model has no GGUF file")
        print("   skipped: " + note)
        out["llama_cpp"] = {"skipped": note}
    else:
        gguf = str(src.directory / src.gguf_file)
        lport = free_port()
        lurl = f"http://127.0.0.1:{lport}"
        threads = str(os.cpu_count() or 2)
        lcmd = [py, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", cfg.name, "--host", "127.0.0.1",
                "--port", str(lport), "--n_ctx", "4096", "--n_threads", threads, "--n_threads_batch", threads,
                # by default a new request interrupts the stream in progress: queue them instead (it
                # serves one request at a time), so every client gets its whole reply
                "--interrupt_requests", "False"]
        lserver = start(lcmd, lurl + "/v1/models", lambda r: r.status_code == 200)
        server = start(cmd, url + "/health", lambda r: r.status_code == 200 and cfg.name in r.json()["loaded_models"])
        try:
            asyncio.run(http_round(lurl, cfg.name, 1, 8, fixed=False))
            asyncio.run(http_round(url, cfg.name, 2, 8))
            lt, tt = [], []
            for _ in range(args.rounds):
                # min_tokens is not a llama.cpp server field: both get greedy, max_tokens, same prompts
                lt.append(asyncio.run(http_round(lurl, cfg.name, 8, args.tokens, fixed=False))[0])
                tt.append(asyncio.run(http_round(url, cfg.name, 8, args.tokens, fixed=False))[0])
            row = {"tta_engine": statistics.median(tt), "llama_cpp": statistics.median(lt)}
            row["ratio"] = row["tta_engine"] / row["llama_cpp"]
            out["llama_cpp"] = row
            print("   tta-engine {tta_engine:.1f} tok/s, llama_cpp.server {llama_cpp:.1f} tok/s, ratio {ratio:.2f} "
                  "(target >= 2)".format(**row))
        finally:
            stop(server)
            stop(lserver)


if __name__ == "__main__":
    sys.exit(main())
