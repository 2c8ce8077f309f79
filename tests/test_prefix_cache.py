"""PrefixCache: longest-prefix lookup, LRU eviction by entries and by bytes, redundant prefixes dropped."""

from __future__ import annotations

import numpy as np
from tta_engine.scheduler import PrefixCache, common_prefix


def Big(layers: int = 2, rows: int = 2, capacity: int = 64):
    """A batched FusedKVCache (per-layer [rows, heads, cap, dim]) filled with random KV."""
    from tta_engine.ort_decoder import FusedKVCache

    rng = np.random.default_rng(0)
    big = FusedKVCache(num_layers=layers, batch=rows, kv_heads=1, head_dim=4, capacity=capacity,
                       max_capacity=capacity)
    for buf in big.keys + big.values:
        buf[:] = rng.standard_normal(buf.shape, dtype=np.float32)
    return big


def test_common_prefix():
    assert common_prefix([1, 2, 3], np.array([1, 2, 4, 5])) == 2
    assert common_prefix([1, 2], np.array([1, 2, 3])) == 2
    assert common_prefix([9], np.array([1])) == 0


def test_lookup_returns_longest_prefix_and_its_kv():
    big, cache = Big(), PrefixCache(max_entries=4, min_tokens=2)
    cache.store(list(range(10)), big, row=0)
    cache.store([0, 1, 2, 50, 51, 52], big, row=1)
    n, (keys, values) = cache.lookup(list(range(8)) + [99])
    assert n == 8
    np.testing.assert_array_equal(keys[1][:, :8], big.keys[1][0, :, :8])
    np.testing.assert_array_equal(values[0][:, :8], big.values[0][0, :, :8])
    assert cache.lookup([7, 7, 7]) == (0, None)


def test_entry_and_byte_bounds_evict_least_recently_used():
    big = Big(capacity=64)
    cache = PrefixCache(max_entries=2, min_tokens=2)
    for start in (0, 100, 200):
        cache.store([start + i for i in range(20)], big, row=0)
    assert [k[0] for k in cache.entries] == [100, 200]
    one = 2 * 2 * 20 * 4 * 4  # layers x (keys, values) x tokens x dim x 4 bytes
    cache = PrefixCache(max_entries=8, min_tokens=2, max_bytes=2 * one)
    for start in (0, 100, 200):
        cache.store([start + i for i in range(20)], big, row=0)
    assert cache.nbytes <= 2 * one and [k[0] for k in cache.entries] == [100, 200]


def test_stored_prefix_of_a_longer_entry_is_not_duplicated():
    big, cache = Big(), PrefixCache(max_entries=4, min_tokens=2)
    cache.store(list(range(5)), big, row=0)
    cache.store(list(range(12)), big, row=0)  # extends the first: the shorter one goes
    cache.store(list(range(7)), big, row=0)  # covered by the longer one: not stored
    assert list(cache.entries) == [tuple(range(12))]
    assert cache.store(list(range(1)), big, row=0) is None and len(cache.entries) == 1  # under min_tokens


def test_growing_a_batch_cache_keeps_the_rows_in_use():
    from tta_engine.ort_decoder import FusedKVCache

    c = FusedKVCache(num_layers=2, batch=4, kv_heads=1, head_dim=4, capacity=8, max_capacity=64)
    for b in c.keys + c.values:
        b[:] = np.arange(4 * 8, dtype=np.float32).reshape(4, 1, 8, 1)
    before = [b.copy() for b in c.keys + c.values]
    c.ensure_capacity(12, keep={0: 5, 2: 8})
    assert c.capacity == 16
    for old, new in zip(before, c.keys + c.values, strict=True):
        np.testing.assert_array_equal(new[0, :, :5], old[0, :, :5])
        np.testing.assert_array_equal(new[2, :, :8], old[2, :, :8])
        assert not new[1].any() and not new[0, :, 5:].any()  # not copied: nothing there to keep
    c.ensure_capacity(20)  # default: everything
    np.testing.assert_array_equal(c.keys[0][2, :, :8], before[0][2, :, :8])


def test_row_operations_copy_snapshot_and_load():
    big = Big(rows=3)
    before = [b.copy() for b in big.keys + big.values]
    snap = big.snapshot_row(0, 10)
    big.copy_row(2, 1, 7)
    for old, new in zip(before, big.keys + big.values, strict=True):
        np.testing.assert_array_equal(new[2, :, :7], old[1, :, :7])
        np.testing.assert_array_equal(new[2, :, 7:], old[2, :, 7:])  # beyond n: untouched
    big.load_row(1, snap, 10)
    for old, new in zip(before, big.keys + big.values, strict=True):
        np.testing.assert_array_equal(new[1, :, :10], old[0, :, :10])
    for buf in big.keys + big.values:
        buf[0] = 0  # the snapshot is a copy, not a view
    assert all(part.any() for part in snap[0] + snap[1])
