"""KV-cached causal-LM forward passes on ONNX Runtime, for the two graph layouts the export stage writes.

- ``fused``: GroupQueryAttention graph. One preallocated buffer per layer and K/V,
  shape [batch, kv_heads, capacity, head_dim], bound as both past and present through IO binding:
  ORT writes the new keys/values in place at each row's position; nothing is copied through Python.
- ``optimum``: Optimum's ``text-generation-with-past`` graph (the unfused fallback). The present
  tensors are kept as ORT-owned OrtValues and fed back as the next step's past, again without copies
  through numpy.

Both expose ``new_cache(batch)`` and ``forward(cache, input_ids) -> last-position logits [batch, vocab]``,
the interface the generator (engine/generator.py) is written against; the PyTorch fallback
(engine/torch_backend.py) implements the same one.
"""

from __future__ import annotations

import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .device import Device, resolve_device
from .errors import ConfigError, context_exceeded
from .kv_memory import HostMemory, kv_memory
from .ort_session import create_session

log = logging.getLogger(__name__)
_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}


class FusedKVCache:
    """Per-layer K/V buffers [batch, kv_heads, capacity, head_dim] and each row's valid length.

    Row operations (``copy_row``, ``snapshot_row``, ``load_row``) are the only way KV moves between rows
    and out of / into the cache; ``rows(start, stop)`` is a view of a row range that OrtDecoder.forward
    accepts like a cache. ``bindings`` holds the IO bindings OrtDecoder builds on these buffers, ``graphs``
    the CUDA graphs captured on them. The buffers live in ``memory`` (engine/kv_memory.py): numpy arrays
    on the CPU (default), ORT-allocated device memory viewed through PyTorch on CUDA. Both slice like
    numpy, so row operations are the same."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 max_capacity: int, *, dtype=np.float32, memory=None):
        self.memory = memory if memory is not None else HostMemory()
        self.dtype = np.dtype(dtype)
        self.shape_tail = (kv_heads, head_dim)
        self.max_capacity = max_capacity
        self.capacity = min(capacity, max_capacity)
        self.num_layers = num_layers
        self.keys = [self._alloc(batch, self.capacity) for _ in range(num_layers)]
        self.values = [self._alloc(batch, self.capacity) for _ in range(num_layers)]
        self.lengths = np.zeros(batch, dtype=np.int64)
        self.bindings = _Bindings()
        self.graphs: list[tuple[Any, int]] = []  # (session, CUDA graph id) captured on these buffers
        self._views: dict[tuple[int, int], KVRows] = {}

    def _alloc(self, batch: int, capacity: int):
        kv_heads, head_dim = self.shape_tail
        return self.memory.zeros((batch, kv_heads, capacity, head_dim), self.dtype)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def address(self) -> tuple[int, tuple[int, ...]]:
        """Where the buffers are (changes when they grow): bindings and views keyed on it are rebuilt."""
        return self.memory.ptr(self.keys[0]), tuple(self.keys[0].shape)

    def ensure_capacity(self, needed: int, keep: dict[int, int] | None = None) -> None:
        """Grow the buffers (doubling, up to the context) so ``needed`` positions fit. ``keep``: the rows
        worth copying, {row: positions} (the batch scheduler's rows in use); default: everything. Copying
        all 16 rows of a batch cache from 512 to 1024 positions took 0.93 s here."""
        if needed <= self.capacity:
            return
        if needed > self.max_capacity:
            raise context_exceeded(needed, self.max_capacity)
        new_cap = min(self.max_capacity, max(needed, 2 * self.capacity))
        for bufs in (self.keys, self.values):
            for i, old in enumerate(bufs):
                new = self._alloc(self.batch, new_cap)
                if keep is None:
                    new[:, :, : self.capacity] = old
                else:
                    for row, n in keep.items():
                        new[row, :, :n] = old[row, :, :n]
                bufs[i] = new
        self.capacity = new_cap
        self._views = {}  # they point at the old buffers

    # -- row operations -----------------------------------------------------------------------------
    def copy_row(self, dst: int, src: int, n: int) -> None:
        """Positions [0, n) of row ``src`` into row ``dst`` (every layer, keys and values)."""
        if dst != src and n > 0:
            for buf in (*self.keys, *self.values):
                buf[dst, :, :n] = buf[src, :, :n]

    def snapshot_row(self, row: int, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """A copy of positions [0, n) of ``row``: (keys, values), one [kv_heads, n, head_dim] per layer."""
        clone = self.memory.clone
        return [clone(k[row, :, :n]) for k in self.keys], [clone(v[row, :, :n]) for v in self.values]

    def load_row(self, row: int, snapshot: tuple[list[np.ndarray], list[np.ndarray]], n: int) -> None:
        """Positions [0, n) of a ``snapshot_row`` result into ``row``."""
        for dst, src in ((self.keys, snapshot[0]), (self.values, snapshot[1])):
            for buf, part in zip(dst, src, strict=True):
                buf[row, :, :n] = part[:, :n]

    def rows(self, start: int, stop: int) -> KVRows:
        """View of rows [start, stop), with their current lengths. Views are kept per range until the
        buffers grow, so the IO bindings OrtDecoder builds on them are reused between steps."""
        view = self._views.get((start, stop))
        if view is None:
            view = self._views[(start, stop)] = KVRows(self, start, stop)
        view.lengths = self.lengths[start:stop].copy()
        return view

    def close(self) -> None:
        self.keys, self.values = [], []
        self._views = {}
        self.bindings.clear()
        for session, graph_id in self.graphs:  # CUDA graphs captured on these buffers
            release = getattr(session, "release_captured_graph", None)  # onnxruntime >= 1.23
            if release is not None:
                release(graph_id)
        self.graphs = []


class KVRows:
    """Rows [start, stop) of a FusedKVCache (``owner``), shaped like a cache for OrtDecoder.forward (which
    updates ``lengths`` here; the owner copies them back)."""

    def __init__(self, big: FusedKVCache, start: int, stop: int):
        self.memory, self.owner = big.memory, big  # where the buffers live; whose they are
        self.keys = [k[start:stop] for k in big.keys]
        self.values = [v[start:stop] for v in big.values]
        self.lengths = big.lengths[start:stop].copy()
        self.capacity = big.capacity
        self.bindings = _Bindings()

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def ensure_capacity(self, needed: int) -> None:
        assert needed <= self.capacity, "the owner grows the batched cache before a step"


class _Bindings(dict):
    """IO bindings per (session, static), valid while the buffers they point at stay where they are
    (``address``)."""

    address: tuple | None = None


class OptimumKVCache:
    """Past key/values as ORT-owned OrtValues on the session's device, grown by ORT at each step (batch 1
    rows in lockstep)."""

    def __init__(self, past_names: list[str], batch: int, kv_heads: int, head_dim: int, dtype, max_capacity: int,
                 ort_device: tuple[str, int] = ("cpu", 0)):
        import onnxruntime as ort

        shape = [batch, kv_heads, 0, head_dim]
        self.past = {n: ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(dtype).type, *ort_device)
                     for n in past_names}
        self.lengths = np.zeros(batch, dtype=np.int64)
        self.max_capacity = max_capacity

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def close(self) -> None:
        self.past = {}


class OrtDecoder:
    """A compiled causal LM: ONNX Runtime session plus the IO layout read from the session itself."""

    def __init__(self, model_path: Path, decoder_meta: dict[str, Any], *, threads: int | None = None,
                 device: str | Device = "auto", device_resident: bool | None = None, cuda_graph: bool = False,
                 static_decode: bool | None = None):
        """``device``: 'auto' | 'cpu' | 'cuda' | 'cuda:N' or a resolved Device. The KV cache, the logits and
        Optimum's present tensors are bound to that device; ``device_resident=True`` uses the device
        memory path (ORT-allocated buffers) on the CPU as well, which is how CPU tests exercise it.

        ``cuda_graph`` (fused graph on CUDA; off by default, not yet measured on a GPU): decode steps are
        captured as CUDA graphs by ONNX Runtime (``enable_cuda_graph``) and replayed. A replay reuses the
        captured addresses and shapes, so decode steps then run in *static* mode (``static_decode``,
        which also runs on the CPU for tests): the KV cache is allocated for the whole context once
        (never grows or moves), each (cache, rows) view has its own IO binding with fixed input
        OrtValues that are updated in place, ``total_sequence_length`` is the constant capacity (GQA
        reads it on the host; per-row lengths come from ``seqlens_k`` on the device), and each binding
        replays its own graph (``gpu_graph_id``). Prompts (several tokens) run uncaptured (id -1)."""
        self.device = resolve_device(device, "onnx")
        self.memory = kv_memory(self.device, device_resident=device_resident)
        self.cuda_graph = bool(cuda_graph) and self.device.is_cuda and decoder_meta["graph"] == "fused"
        self.static_decode = decoder_meta["graph"] == "fused" and (
            self.cuda_graph if static_decode is None else bool(static_decode))
        self._graph_ids = itertools.count(1)
        # Optional second graph for prompts (same IO and KV layout, other kernels: e.g. int8 on AMX/VNNI
        # prefills several times faster than int4 MatMulNBits, while int4 decodes faster). Both sessions
        # are created at once (ONNX Runtime releases the GIL while it initializes one): most of a cold start.
        prefill = decoder_meta.get("prefill") if decoder_meta["graph"] == "fused" else None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tta-load") as pool:
            pending = pool.submit(create_session, Path(model_path).parent / prefill["file"], threads=threads,
                                  device=self.device) if prefill else None
            try:
                self.session = create_session(model_path, threads=threads, device=self.device,
                                              cuda_graph=self.cuda_graph,
                                              prepack=decoder_meta.get("prepack_weights", True))
            except Exception as exc:  # noqa: BLE001 - ORT refuses capture when a node is not on the CUDA provider
                if not self.cuda_graph:
                    raise
                raise ConfigError(
                    f"cuda_graph=True: ONNX Runtime cannot capture {Path(model_path).name} as a CUDA graph "
                    f"({str(exc).splitlines()[0][:200]}). Every node must run on the CUDA provider, which for the "
                    "fused graph means an fp16 artifact (GroupQueryAttention has CUDA kernels for fp16/bf16 "
                    "only): `tta-engine export NAME --precision fp16`, or drop cuda_graph.") from exc
            self.prefill_session = pending.result() if pending is not None else None
        self.prefill_min_tokens = int(prefill.get("min_tokens", 16)) if prefill else 1 << 30
        self.last_logits = bool(decoder_meta.get("fused", {}).get("last_position_logits", False))
        self.meta = decoder_meta
        self.layout = decoder_meta["graph"]
        self.context_length = int(decoder_meta["context_length"])
        self.num_layers = int(decoder_meta["num_layers"])
        self.kv_heads = int(decoder_meta["num_kv_heads"])
        self.head_dim = int(decoder_meta["head_dim"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.past_names = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_layer_order)
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.kv_dtype = _NP_DTYPES.get(inputs[self.past_names[0]].type, np.float32) if self.past_names else np.float32
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.logits_dtype = _NP_DTYPES.get(outputs["logits"].type, np.float32)
        if self.device.is_cuda and self.layout == "fused" and self.kv_dtype != np.float16:
            log.warning("%s on %s: GroupQueryAttention has no fp32 CUDA kernel, so attention runs on the CPU "
                        "with the KV cache copied each step; export --precision fp16 for the GPU",
                        Path(model_path).parent.name, self.device)
        self.vocab_size = int(decoder_meta["vocab_size"])

    # -- caches -------------------------------------------------------------------------------------
    def new_cache(self, batch: int = 1, capacity: int = 256):
        if self.layout == "fused":
            if self.static_decode:  # fixed addresses for the whole life of the cache
                capacity = self.context_length
            return FusedKVCache(self.num_layers, batch, self.kv_heads, self.head_dim, capacity, self.context_length,
                                dtype=self.kv_dtype, memory=self.memory)
        return OptimumKVCache(self.past_names, batch, self.kv_heads, self.head_dim, self.kv_dtype,
                              self.context_length, self.memory.ort_device)

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, cache, input_ids: np.ndarray, *, all_logits: bool = False,
                prefill_graph: bool = False) -> np.ndarray:
        """Append ``input_ids`` [batch, seq] to ``cache``; return logits [batch, vocab] of the last position
        (or [batch, seq, vocab] with ``all_logits``, which the fused graph only has for its last position).
        ``prefill_graph``: run on the prefill graph (when the artifact has one) even for one token per row
        -- the batch scheduler's throughput option for wide decode steps."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        new_lengths = cache.lengths + input_ids.shape[1]
        if int(new_lengths.max()) > self.context_length:
            raise context_exceeded(int(new_lengths.max()), self.context_length)
        if self.layout == "fused":
            logits = self._forward_fused(cache, input_ids, new_lengths, prefill_graph)
        else:
            logits = self._forward_optimum(cache, input_ids, new_lengths)
        cache.lengths = new_lengths
        # only the rows asked for cross to the host (on CUDA: the last position's logits)
        logits = self.memory.to_host(logits if all_logits else logits[:, -1, :])
        return logits.astype(np.float32, copy=False)

    def prefill(self, cache, ids: np.ndarray) -> np.ndarray:
        """Append prompt tokens ``ids`` [batch, seq]; logits of the last position [batch, vocab]. The fused
        layout runs every prompt chunk on the prefill graph (when the artifact has one), whatever its
        length: measured on the int4 default (benchmarks/measure_invariance.py), that graph computes a
        position's KV and logits bit-identically however the prompt is split into chunks of >= 2 tokens,
        which is what lets the batch scheduler reuse a prefix without changing the output."""
        ids = np.asarray(ids, dtype=np.int64)
        return self.forward(cache, ids, prefill_graph=self.layout == "fused")

    def _forward_fused(self, cache: FusedKVCache, ids: np.ndarray, new_lengths: np.ndarray,
                       prefill_graph: bool = False):
        cache.ensure_capacity(int(new_lengths.max()))
        wide = prefill_graph or ids.shape[1] >= self.prefill_min_tokens
        session = self.prefill_session if wide and self.prefill_session is not None else self.session
        if self.static_decode and ids.shape[1] == 1 and session is self.session:
            return self._static_step(cache, ids, new_lengths)
        io, logits = self._kv_binding(cache, session)
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("seqlens_k", (new_lengths - 1).astype(np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(new_lengths.max(), dtype=np.int32))
        cache.memory.sync()
        session.run_with_iobinding(io, self._uncaptured if self.cuda_graph and session is self.session else None)
        if logits is None:
            logits = self.memory.from_ortvalue(io.get_outputs()[0])
        return logits  # the binding's buffer, reused by the next step: forward copies it to the host

    def _static_step(self, cache, ids: np.ndarray, new_lengths: np.ndarray):
        """One decode step on a binding whose every address is fixed (see ``cuda_graph``)."""
        import onnxruntime as ort

        io, logits = self._kv_binding(cache, self.session, static=True)
        if not hasattr(io, "tta_inputs"):
            dev, dev_id = cache.memory.ort_device
            rows = ids.shape[0]
            io.tta_inputs = (ort.OrtValue.ortvalue_from_shape_and_type([rows, 1], np.int64, dev, dev_id),
                             ort.OrtValue.ortvalue_from_shape_and_type([rows], np.int32, dev, dev_id),
                             ort.OrtValue.ortvalue_from_numpy(np.array(cache.capacity, dtype=np.int32)))
            for name, value in zip(("input_ids", "seqlens_k", "total_sequence_length"), io.tta_inputs, strict=True):
                io.bind_ortvalue_input(name, value)
            io.tta_run_options = None
            if self.cuda_graph:
                graph_id = next(self._graph_ids)
                io.tta_run_options = ort.RunOptions()
                io.tta_run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
                getattr(cache, "owner", cache).graphs.append((self.session, graph_id))  # a view: its cache's
        ids_value, seqlens_value, _ = io.tta_inputs
        ids_value.update_inplace(ids)
        seqlens_value.update_inplace((new_lengths - 1).astype(np.int32))
        cache.memory.sync()
        self.session.run_with_iobinding(io, io.tta_run_options)
        return logits if logits is not None else self.memory.from_ortvalue(io.get_outputs()[0])

    @property
    def _uncaptured(self):
        """Run options for a run that must not be captured (or replayed) as a CUDA graph."""
        import onnxruntime as ort

        opts = self.__dict__.get("_uncaptured_opts")
        if opts is None:
            opts = self._uncaptured_opts = ort.RunOptions()
            opts.add_run_config_entry("gpu_graph_id", "-1")
        return opts

    def _kv_binding(self, cache, session, static: bool = False):
        """An IO binding with every layer's K/V buffer bound as past and present (shared, in place), and
        the logits bound to a preallocated buffer when the graph emits the last position only -- all on
        the cache's device. Kept on the cache per session and rebuilt only when the buffers move
        (growth): ~120 binds saved a step."""
        memory = cache.memory
        buffers = (memory.ptr(cache.keys[0]), tuple(cache.keys[0].shape))
        bindings = cache.bindings
        if bindings.address != buffers:  # new cache, or its buffers moved (growth)
            bindings.clear()
            bindings.address = buffers
        key = (id(session), static)
        if key in bindings:
            return bindings[key]
        io = session.io_binding()
        dev, dev_id = memory.ort_device
        logits = None
        if self.last_logits:
            logits = memory.empty((cache.keys[0].shape[0], 1, self.vocab_size), self.logits_dtype)
            io.bind_output("logits", dev, dev_id, self.logits_dtype, tuple(logits.shape), memory.ptr(logits))
        else:
            io.bind_output("logits", dev, dev_id)  # first, so that get_outputs()[0] is the logits
        shape = tuple(cache.keys[0].shape)
        for i in range(self.num_layers):
            for kind, buf in (("key", cache.keys[i]), ("value", cache.values[i])):
                ptr = memory.ptr(buf)
                io.bind_input(f"past_key_values.{i}.{kind}", dev, dev_id, self.kv_dtype, shape, ptr)
                io.bind_output(f"present.{i}.{kind}", dev, dev_id, self.kv_dtype, shape, ptr)
        bindings[key] = (io, logits)
        return io, logits

    def _forward_optimum(self, cache: OptimumKVCache, ids: np.ndarray, new_lengths: np.ndarray) -> np.ndarray:
        batch, seq = ids.shape
        past = int(cache.lengths.max())
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        if "attention_mask" in self.input_names:
            io.bind_cpu_input("attention_mask", np.ones((batch, past + seq), dtype=np.int64))
        if "position_ids" in self.input_names:
            pos = np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq))
            io.bind_cpu_input("position_ids", np.ascontiguousarray(pos))
        for name in self.past_names:
            io.bind_ortvalue_input(name, cache.past[name])
        dev, dev_id = self.memory.ort_device
        io.bind_output("logits", dev, dev_id)
        for name in self.present_names:
            io.bind_output(name, dev, dev_id)
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        for past_name, value in zip(self.past_names, outs[1:], strict=True):
            cache.past[past_name] = value
        return self.memory.from_ortvalue(outs[0])

    def close(self) -> None:
        self.session = self.prefill_session = None


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return int(parts[1]), parts[2]
