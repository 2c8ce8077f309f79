"""Soak test of the model manager (issue 9; not run in CI): many concurrent streams, random cancellations,
stop strings and seeds, then load/unload cycles. Prints one report and exits 1 when a must-hold figure
fails (lost requests, cross-talk, untyped failures, RSS not returning).

  1. ``--requests`` requests (default 256) through ``--streams`` (64) concurrent streams on the default
     int4 SmolLM2: a quarter are cancelled at random points (closing the stream after a random number of
     deltas, or cancelling the task after a random delay), a third are seeded samples, a third greedy,
     some with stop strings. Every request must end as completed, cancelled or failed with a typed error:
     "lost" counts the ones that did not (a hang past the timeout, a missing result) and must be 0.
  2. Cross-talk: every completed seeded or greedy request is run again alone; its text must equal the
     text it got among 64 streams (0 mismatches).
  3. ``--cycles`` (20) load/unload cycles of both defaults (a request / an embedding each time); the RSS
     after each cycle must stay within 50 MB of the first cycle's (the plateau).

    .venv/bin/python benchmarks/soak.py --artifacts artifacts      # exports the defaults first if missing
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tta_engine.config import load_model_configs
from tta_engine.errors import TTAEngineError
from tta_engine.manager import TransformersModelManager, export_missing

DEFAULT_LM, DEFAULT_EMB = "smollm2-135m-instruct", "all-minilm-l6-v2"
SCENES = ["the misty harbour", "an old lighthouse", "a quiet forest at dusk", "the mill by the river",
          "a lantern-lit cave", "a garden after rain", "the village square", "a mountain path"]
ACTIONS = ["I look around.", "I listen carefully.", "I sit down and breathe.", "I call out softly.",
           "I walk towards the light.", "I pick up a smooth stone."]


def rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 1e6
    except ImportError:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


@dataclass
class Spec:
    i: int
    messages: list
    kwargs: dict
    cancel_after_deltas: int | None = None
    cancel_after_s: float | None = None

    @property
    def reproducible(self) -> bool:
        return self.kwargs.get("temperature") == 0 or self.kwargs.get("seed") is not None


@dataclass
class Outcome:
    spec: Spec
    status: str  # completed | cancelled | failed | failed-untyped | lost
    text: str = ""
    ttft_s: float | None = None
    error: str = ""


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


def make_specs(n: int, rng: random.Random) -> list[Spec]:
    specs = []
    for i in range(n):
        messages = [{"role": "system", "content": f"You are the gentle narrator of a calm text adventure set in "
                                                  f"{SCENES[i % len(SCENES)]}."},
                    {"role": "user", "content": ACTIONS[rng.randrange(len(ACTIONS))]}]
        kind = i % 3
        kwargs: dict = {"max_tokens": rng.randint(16, 48)}
        if kind == 0:
            kwargs.update(temperature=0.8, top_p=0.95, seed=rng.randrange(10**6))
        elif kind == 1:
            kwargs.update(temperature=0)
        else:
            kwargs.update(temperature=0.9)  # unseeded: not comparable, exercises the sampler
        if rng.random() < 0.3:
            kwargs["stop"] = [rng.choice([".", "\n", " the ", ","])]
        spec = Spec(i, messages, kwargs)
        if rng.random() < 0.25:  # a quarter cancelled at a random point
            if rng.random() < 0.5:
                spec.cancel_after_deltas = rng.randint(0, 12)
            else:
                spec.cancel_after_s = rng.uniform(0.0, 2.0)
        specs.append(spec)
    return specs


async def run_one(manager, lm: str, spec: Spec, timeout_s: float) -> Outcome:
    t0 = time.perf_counter()
    first = None
    parts: list[str] = []

    async def consume() -> str:
        nonlocal first
        stream = manager.astream(spec.messages, lm, **spec.kwargs)
        try:
            async for delta in stream:
                if first is None:
                    first = time.perf_counter() - t0
                parts.append(delta)
                if spec.cancel_after_deltas is not None and len(parts) >= spec.cancel_after_deltas:
                    return "cancelled"
            return "completed"
        finally:
            await stream.aclose()

    task = asyncio.ensure_future(consume())
    try:
        if spec.cancel_after_s is not None:
            done, _ = await asyncio.wait({task}, timeout=spec.cancel_after_s)
            if not done:
                task.cancel()
                try:
                    await asyncio.wait_for(task, timeout_s)
                except asyncio.CancelledError:
                    return Outcome(spec, "cancelled", "".join(parts), first)
        status = await asyncio.wait_for(task, timeout_s)
        return Outcome(spec, status, "".join(parts), first)
    except TimeoutError:
        return Outcome(spec, "lost", "".join(parts), first, "timed out")
    except TTAEngineError as exc:
        return Outcome(spec, "failed", "".join(parts), first, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - counted: the engine must not raise these
        return Outcome(spec, "failed-untyped", "".join(parts), first, f"{type(exc).__name__}: {exc}")


async def soak(manager, lm: str, specs: list[Spec], streams: int, timeout_s: float) -> Report:
    sem = asyncio.Semaphore(streams)

    async def limited(spec):
        async with sem:
            return await run_one(manager, lm, spec, timeout_s)

    results = await asyncio.gather(*(limited(s) for s in specs), return_exceptions=True)
    report = Report()
    for spec, res in zip(specs, results, strict=True):
        report.outcomes.append(res if isinstance(res, Outcome) else Outcome(spec, "lost", error=repr(res)))
    return report


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=None)
    ap.add_argument("--config", type=Path, default=None, help="model config TOML (default: the packaged one)")
    ap.add_argument("--lm", default=DEFAULT_LM)
    ap.add_argument("--embedder", default=DEFAULT_EMB)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="per request, seconds (past it: lost)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    LM, EMB = args.lm, args.embedder
    manager = TransformersModelManager(load_model_configs(args.config), artifacts_root=args.artifacts,
                                       threads=args.threads, max_queue=max(64, args.streams))
    for name in (LM, EMB):
        export_missing(manager.model_configs[name], args.artifacts, announce=print)
    failures = []
    try:
        manager.load_model(LM)
        asyncio.run(manager.generate([{"role": "user", "content": "Hello."}], LM, max_tokens=4, temperature=0))
        rss_before = rss_mb()
        specs = make_specs(args.requests, random.Random(args.seed))
        t0 = time.perf_counter()
        report = asyncio.run(soak(manager, LM, specs, args.streams, args.timeout))
        wall = time.perf_counter() - t0
        rss_after = rss_mb()
        st = manager.stats()[LM]

        # cross-talk: each reproducible request that completed, alone
        mismatches, compared = [], 0
        for o in report.outcomes:
            if o.status == "completed" and o.spec.reproducible:
                compared += 1
                solo = asyncio.run(manager.generate(o.spec.messages, LM, **o.spec.kwargs))
                if solo != o.text:
                    mismatches.append((o.spec.i, o.text[:60], solo[:60]))
        ttfts = [o.ttft_s for o in report.outcomes if o.ttft_s is not None]
        lost = report.count("lost") + (len(specs) - len(report.outcomes))
        print(f"\nsoak: {len(specs)} requests, {args.streams} concurrent streams, {LM} "
              f"({manager.model_configs[LM].precision}), {wall:.1f} s")
        for status in ("completed", "cancelled", "failed", "failed-untyped"):
            print(f"  {status:15} {report.count(status)}")
        print(f"  {'lost':15} {lost}")
        for o in report.outcomes:
            if o.status.startswith("failed") or o.status == "lost":
                print(f"    request {o.spec.i}: {o.status}: {o.error}")
        print(f"  cross-talk: {len(mismatches)} mismatches of {compared} seeded/greedy requests rerun alone")
        for i, got, solo in mismatches[:5]:
            print(f"    request {i}: {got!r} vs alone {solo!r}")
        print(f"  TTFT p50 {1000 * percentile(ttfts, 0.5):.0f} ms, p99 {1000 * percentile(ttfts, 0.99):.0f} ms "
              f"({len(ttfts)} requests with a first token)")
        print(f"  tokens: {st['completion_tokens']} completion, manager counts {st['completed']} completed / "
              f"{st['cancelled']} cancelled")
        print(f"  RSS before {rss_before:.0f} MB, after {rss_after:.0f} MB")
        if lost:
            failures.append(f"{lost} lost")
        if report.count("failed-untyped"):
            failures.append(f"{report.count('failed-untyped')} untyped failures")
        if mismatches:
            failures.append(f"{len(mismatches)} cross-talk mismatches")

        # load/unload cycles
        manager.unload_model(LM)
        plateau, samples = None, []
        for _ in range(args.cycles):
            asyncio.run(manager.generate([{"role": "user", "content": "A short reply."}], LM, max_tokens=8,
                                         temperature=0))
            manager.get_embeddings(["calm", "anxious"], EMB)
            manager.unload_model(LM)
            manager.unload_model(EMB)
            rss = rss_mb()
            samples.append(rss)
            plateau = rss if plateau is None else plateau
        drift = max(samples) - plateau
        print(f"  {args.cycles} load/unload cycles of {LM} + {EMB}: RSS after cycle 1 {plateau:.0f} MB, "
              f"max {max(samples):.0f} MB, last {samples[-1]:.0f} MB (drift {drift:+.0f} MB, limit 50)")
        print("    per cycle: " + " ".join(f"{x:.0f}" for x in samples))
        if drift > 50:
            failures.append(f"RSS drifted {drift:.0f} MB over {args.cycles} cycles")
    finally:
        manager.close()
    print("\nRESULT: " + ("ok" if not failures else "FAILED: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
