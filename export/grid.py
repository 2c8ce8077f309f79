"""Exact re-encoding of weights that already lie on a block grid (GGUF sources: Q4_0 ... Q8_0, K-quants).

A GGUF matrix is stored in blocks (32 weights for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the sub-blocks of Q4_K and
Q5_K; 16 for the sub-blocks of Q2_K, Q3_K and Q6_K), each ``w = s * q + m`` with integer q and float s, m.
Re-quantizing the dequantized weights round-to-nearest loses a lot (measured on Gemma 3 270M, whose Q4_K_M
GGUF mixes Q4_K, Q5_0, Q6_K and Q8_0: top-1 0.51, KL 0.37 with the non-Q4 matrices forced to 4 bits).
This pass recovers, per block, a step s and integers q with ``w == s * (q - z) + r`` exactly, and writes
MatMulNBits with the fewest bits that hold q (4 or 8; zero point z = 2**(bits-1), ORT's default):

    x @ W = MatMulNBits(x; q, s)  +  BlockSum(x) @ R,    R[b, n] = r[b, n]

BlockSum(x)[..., b] is the sum of x over block b: ReduceSum over the last axis of x reshaped to [..., K/block, block]
when the rank of x is known (``activation_rank``; the decoders' hidden states are [batch, seq, hidden]),
else x @ E with E a 0/1 block indicator, any rank (measured on SmolLM2-135M's Q4_1 GGUF, 2-core AVX-512 VNNI
EPYC: the reshape is 3-4% faster per decode step than x @ E at 1-16 rows). The correction is omitted when
every r is 0 (symmetric grids: Q4_0, Q5_0, Q8_0, Q3_K, Q6_K). A block's q are found without knowing the GGUF type:
with ``u = (w - base) / span`` (symmetric: base 0, span max|w|; asymmetric: base min, span max - min),
the block is on a grid of k steps iff every ``u * k`` is an integer, for some k up to the levels the bits
allow; any such k is exact, so the search takes the first that fits, largest first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_io import drop_unused_initializers

TOL = 1e-3  # of one quantization step: a block within it is on the grid (float rounding is ~1e-5 here)
SAMPLE = 256  # blocks tried first, so that a matrix off any grid is rejected after a few cheap passes


@dataclass(frozen=True)
class Grid:
    """``w[k, n] = scale[n, b] * (q[n, b, i] - 2**(bits-1)) + residual[n, b]`` for k = b * block + i."""

    q: np.ndarray  # uint8 [N, K/block, block], values < 2**bits
    scale: np.ndarray  # float32 [N, K/block]
    residual: np.ndarray | None  # float32 [N, K/block], None when all zero
    bits: int
    block: int

    def dequantize(self) -> np.ndarray:
        w = self.scale[..., None] * (self.q.astype(np.float32) - (1 << (self.bits - 1)))
        if self.residual is not None:
            w = w + self.residual[..., None]
        return w.reshape(w.shape[0], -1).T


@dataclass
class GridResult:
    encoded: dict[str, Grid] = field(default_factory=dict)  # MatMul node name -> its grid
    correction_nodes: list[str] = field(default_factory=list)  # nodes other quantizers must leave alone

    def summary(self) -> dict[str, int]:
        """How many matrices went to each layout, e.g. {'4-bit/32': 27, '8-bit/32': 46, '8-bit/16': 9}."""
        out: dict[str, int] = {}
        for g in self.encoded.values():
            key = f"{g.bits}-bit/{g.block}"
            out[key] = out.get(key, 0) + 1
        return out


def _steps(u: np.ndarray, kmax: int) -> np.ndarray | None:
    """Per block (rows of u), the largest k <= kmax with every u * k an integer; None if a block has none."""
    k = np.zeros(len(u), np.int64)
    todo = np.arange(len(u))
    for cand in range(kmax, 0, -1):
        x = u[todo] * np.float32(cand)
        ok = (np.abs(x - np.rint(x)) <= TOL).all(1)
        k[todo[ok]] = cand
        todo = todo[~ok]
        if not len(todo):
            return k
    return None


def _fit(flat: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """Blocks [B, block] -> (q uint8, step, residual or None) for one layout, or None."""
    if symmetric:
        base = np.zeros(len(flat), np.float32)
        span = np.abs(flat).max(1)
        kmax = (1 << (bits - 1)) - 1  # q in [-kmax, kmax] around the zero point
    else:
        base = flat.min(1)
        span = flat.max(1) - base
        kmax = (1 << bits) - 1
    span = np.where(span > 0, span, np.float32(1.0))  # constant (or zero) block: any step fits
    u = (flat - base[:, None]) / span[:, None]
    k = _steps(u, kmax)
    if k is None:
        return None
    step = (span / k).astype(np.float32)
    q = np.rint(u * k[:, None].astype(np.float32))
    zero = 1 << (bits - 1)
    if symmetric:
        return (q + zero).astype(np.uint8), step, None
    level0 = -base / step  # the level where w == 0: an integer for Q4_0-like blocks, then no correction
    shifted = q + (zero - np.rint(level0))[:, None]
    if (np.abs(level0 - np.rint(level0)) <= TOL).all() and shifted.min() >= 0 and shifted.max() < (1 << bits):
        return shifted.astype(np.uint8), step, None
    return q.astype(np.uint8), step, (base + zero * step).astype(np.float32)


def _fit_all(flat: np.ndarray, bits: int, symmetric: bool, chunk: int = 1 << 16):
    """_fit over chunks of blocks (bounded memory on a 262k-row embedding); a sample first, so a matrix
    off this grid is rejected after a few cheap passes."""
    if len(flat) > SAMPLE and _fit(flat[np.linspace(0, len(flat) - 1, SAMPLE).astype(int)], bits, symmetric) is None:
        return None
    parts = []
    for i in range(0, len(flat), chunk):
        part = _fit(flat[i:i + chunk], bits, symmetric)
        if part is None:
            return None
        parts.append(part)
    q = np.concatenate([p[0] for p in parts])
    step = np.concatenate([p[1] for p in parts])
    with_residual = [p for p in parts if p[2] is not None]
    residual = None
    if with_residual:  # chunks without one have residual 0 by construction (shifted to the zero point)
        residual = np.concatenate([p[2] if p[2] is not None else np.zeros_like(p[1]) for p in parts])
    return q, step, residual


def detect_grid(w: np.ndarray, blocks: tuple[int, ...] = (32, 16)) -> Grid | None:
    """w [K, N] -> the exact block grid with the fewest bits, then the largest block, then no correction
    term (4 bits in blocks of 16 beat 8 bits in blocks of 32 on bytes and speed); None when the weights
    lie on no 4- or 8-bit grid of these block sizes."""
    k_dim, n = w.shape
    wt = np.ascontiguousarray(w.T, dtype=np.float32)
    for bits in (4, 8):
        for block in blocks:
            if k_dim % block:
                continue
            flat = wt.reshape(-1, block)
            for symmetric in (True, False):
                found = _fit_all(flat, bits, symmetric)
                if found is not None:
                    q, step, residual = found
                    nb = k_dim // block
                    return Grid(q.reshape(n, nb, block), step.reshape(n, nb),
                                None if residual is None else residual.reshape(n, nb), bits, block)
    return None


def _pack(grid: Grid) -> np.ndarray:
    """MatMulNBits' B: [N, blocks, block * bits / 8], 4-bit values low nibble first."""
    q = grid.q
    if grid.bits == 8:
        return q
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _block_sum_nodes(graph: onnx.GraphProto, x: str, out: str, name: str, k: int, block: int,
                     rank: int | None, made: set[str]) -> list[onnx.NodeProto]:
    """Nodes computing ``out[..., b] = sum of x[..., b * block:(b + 1) * block]``; constants made once."""
    if rank is None:  # x @ E: E[k, b] = 1 where k lies in block b
        const = f"grid.block_indicator_{k}_{block}"
        if const not in made:
            indicator = np.kron(np.eye(k // block, dtype=np.float32), np.ones((block, 1), np.float32))
            graph.initializer.append(numpy_helper.from_array(indicator, const))
            made.add(const)
        return [helper.make_node("MatMul", [x, const], [out], name=name)]
    shape, axis = f"grid.blocks_shape_{rank}_{k}_{block}", "grid.last_axis"
    for const, value in ((shape, [0] * (rank - 1) + [k // block, block]), (axis, [-1])):
        if const not in made:
            graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), const))
            made.add(const)
    return [helper.make_node("Reshape", [x, shape], [f"{out}.blocks"], name=f"{name}.blocks"),
            helper.make_node("ReduceSum", [f"{out}.blocks", axis], [out], name=name, keepdims=0)]


def encode_grid_weights(model: onnx.ModelProto, *, accuracy_level: int = 4, skip: tuple[str, ...] = (),
                        blocks: tuple[int, ...] = (32, 16), base_dir: str = "",
                        activation_rank: int | None = None) -> GridResult:
    """Replace every MatMul whose constant weight lies on a block grid with the exact encoding above
    (``base_dir``: where weights stored as external data are read from, one at a time;
    ``activation_rank``: the rank of every MatMul's input, when the graph's layout fixes it)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    result = GridResult()
    nodes: list[onnx.NodeProto] = []
    made: set[str] = set()
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        grid = None
        if weight is not None and node.name not in skip and weight.data_type == onnx.TensorProto.FLOAT:
            w = numpy_helper.to_array(weight, base_dir)
            grid = detect_grid(w, blocks) if w.ndim == 2 else None
        if grid is None:
            nodes.append(node)
            continue
        k, n = w.shape
        base, x, out = node.input[1], node.input[0], node.output[0]
        graph.initializer.extend([
            numpy_helper.from_array(_pack(grid), f"{base}.q{grid.bits}"),
            numpy_helper.from_array(grid.scale.reshape(-1), f"{base}.scales"),
        ])
        main_out = f"{out}.main" if grid.residual is not None else out
        nodes.append(helper.make_node(
            "MatMulNBits", [x, f"{base}.q{grid.bits}", f"{base}.scales"], [main_out], name=f"{node.name}.q{grid.bits}",
            domain="com.microsoft", K=k, N=n, bits=grid.bits, block_size=grid.block, accuracy_level=accuracy_level))
        if grid.residual is not None:
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(grid.residual.T), f"{base}.block_offsets"))
            names = [f"{node.name}.{s}" for s in ("block_sum", "offset", "add")]
            sums = _block_sum_nodes(graph, x, f"{out}.block_sum", names[0], k, grid.block, activation_rank, made)
            nodes += sums + [
                helper.make_node("MatMul", [f"{out}.block_sum", f"{base}.block_offsets"], [f"{out}.offset"], name=names[1]),
                helper.make_node("Add", [main_out, f"{out}.offset"], [out], name=names[2]),
            ]
            names += [n.name for n in sums if n.name != names[0]]
            result.correction_nodes += names
        result.encoded[node.name] = grid
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)
    return result
