"""The CPU KV cache is zero and costs resident memory only for the pages written."""

from __future__ import annotations

from pathlib import Path

import torch

from compiled_serve.engine.kv_cache import allocate_kv_cache, lazy_zeros_cpu


def _rss_mb() -> float:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_the_cpu_cache_is_zero_writable_and_committed_only_where_written() -> None:
    before = _rss_mb()
    caches = allocate_kv_cache(2, 4096, 16, 3, 64, torch.float32, torch.device("cpu"))  # 2 x 96 MiB
    assert [tuple(c.shape) for c in caches] == [(2, 4096, 16, 3, 64)] * 2 and caches[0].is_contiguous()
    assert caches[0].data_ptr() != caches[1].data_ptr()
    assert _rss_mb() - before < 20  # nothing committed yet
    caches[0][:, :8] = 1.0
    flat = caches[1].view(2, -1, 3, 64)
    flat[:, torch.tensor([3, 60_000])] = 2.0
    assert float(caches[0][:, :8].sum()) == 2 * 8 * 16 * 3 * 64 and float(caches[0][:, 8:].abs().max()) == 0
    assert float(caches[1].sum()) == 2 * 2 * 3 * 64 * 2
    assert _rss_mb() - before < 40  # a few written pages, not 192 MiB


def test_lazy_zeros_keeps_its_mapping_alive() -> None:
    t = lazy_zeros_cpu((3, 5), torch.bfloat16)
    t += 1
    assert t.dtype == torch.bfloat16 and torch.equal(t, torch.ones(3, 5, dtype=torch.bfloat16))
