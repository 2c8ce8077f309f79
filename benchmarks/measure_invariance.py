"""Which computations of a fused artifact are bit-identical (the facts the determinism contract rests on).

    python benchmarks/measure_invariance.py ARTIFACT_DIR [--prompt-len 40]

(a) decode step: a row stepped inside a batch of n rows vs the same row stepped alone (decode graph,
    and the prefill graph as ``wide_step_rows`` uses it);
(b) prefill: the same chunk from the same prior KV, twice;
(c) chunking: positions computed in one chunk vs split into chunks (logits and KV);
(d) graph: one token through the decode graph vs the prefill graph.
Prints the max |difference| of logits / KV (0 = bit-identical).
"""

from __future__ import annotations

import argparse

import numpy as np
from tta_engine.artifact import load_artifact
from tta_engine.runtime import open_artifact_lm


def run(dec, chunks, capacity=512, graph=None):
    """Feed ``chunks`` (lists of ids) into a fresh batch-1 cache; last logits and the cache."""
    cache = dec.new_cache(1, capacity=capacity)
    logits = None
    for c in chunks:
        ids = np.asarray([c], dtype=np.int64)
        logits = dec.forward(cache, ids, prefill_graph=graph == "prefill") if graph != "decode" else \
            _decode_graph(dec, cache, ids)
    return logits[0], cache


def _decode_graph(dec, cache, ids):
    saved, dec.prefill_min_tokens = dec.prefill_min_tokens, 1 << 30
    try:
        return dec.forward(cache, ids)
    finally:
        dec.prefill_min_tokens = saved


def kv_diff(a, b, n):
    return max(float(np.abs(x[:, :, :n] - y[:, :, :n]).max()) for x, y in zip(a.keys + a.values, b.keys + b.values,
                                                                               strict=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 4, 8, 16])
    args = ap.parse_args()
    lm = open_artifact_lm(load_artifact(args.artifact))
    dec = lm.backend
    rng = np.random.default_rng(0)
    vocab = min(dec.vocab_size, 2000)
    L = args.prompt_len
    prompt = [int(t) for t in rng.integers(3, vocab, L)]
    print(f"artifact {args.artifact}: prefill graph {'yes' if dec.prefill_session else 'no'}, "
          f"prefill_min_tokens {dec.prefill_min_tokens}")

    # (b) same chunk, same prior KV, twice
    l1, c1 = run(dec, [prompt])
    l2, c2 = run(dec, [prompt])
    print(f"(b) prefill {L} tokens twice: logits {np.abs(l1 - l2).max():.3g}, KV {kv_diff(c1, c2, L):.3g}")

    # (c) chunking
    for split in ([L - 1, 1], [32, L - 32], [16, 16, L - 32], [8] * (L // 8)):
        if sum(split) != L:
            continue
        chunks, i = [], 0
        for s in split:
            chunks.append(prompt[i:i + s])
            i += s
        for graph in (None, "prefill"):
            ls, cs = run(dec, chunks, graph=graph)
            print(f"(c) chunks {split} ({graph or 'auto'} graph) vs one chunk: logits {np.abs(ls - l1).max():.3g}, "
                  f"KV {kv_diff(cs, c1, L):.3g}")
    # same positions, one extra token in the chunk (does position p depend on what follows it?)
    lx, cx = run(dec, [prompt + [5]])
    print(f"(c) KV of {L} positions computed in a {L + 1}-token chunk vs a {L}-token chunk: {kv_diff(cx, c1, L):.3g}")
    l32, c32 = run(dec, [prompt[:32], prompt[32:]])
    l32b, c32b = run(dec, [prompt[:32], prompt[32:]])
    print(f"(b) chunks [32, {L - 32}] twice: logits {np.abs(l32 - l32b).max():.3g}")

    # (d) one token: decode graph vs prefill graph
    if dec.prefill_session is not None:
        ld, _ = run(dec, [prompt[:-1], prompt[-1:]], graph="decode")
        lp, _ = run(dec, [prompt[:-1], prompt[-1:]], graph="prefill")
        print(f"(d) last token through decode vs prefill graph (same prior KV): logits {np.abs(ld - lp).max():.3g}")

    # (a) batched decode vs alone
    for graph in ("decode", "prefill") if dec.prefill_session is not None else ("decode",):
        for n in args.rows:
            prompts = [[int(t) for t in rng.integers(3, vocab, L + 3 * r)] for r in range(n)]
            big = dec.new_cache(n, capacity=512)
            alone = []
            for r, p in enumerate(prompts):
                _, c = run(dec, [p])
                for dst, src in ((big.keys, c.keys), (big.values, c.values)):
                    for d, s in zip(dst, src, strict=True):
                        d[r] = s[0]
                big.lengths[r] = len(p)
                tok = np.asarray([[7]], dtype=np.int64)
                la = _decode_graph(dec, c, tok) if graph == "decode" else dec.forward(c, tok, prefill_graph=True)
                alone.append(la[0])
            toks = np.full((n, 1), 7, dtype=np.int64)
            lb = _decode_graph(dec, big, toks) if graph == "decode" else dec.forward(big, toks, prefill_graph=True)
            diff = max(float(np.abs(lb[r] - alone[r]).max()) for r in range(n))
            print(f"(a) {graph} graph: decode step of {n} rows vs each row alone: logits {diff:.3g}")


if __name__ == "__main__":
    main()
