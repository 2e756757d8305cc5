"""The build cache: where it lives, LRU eviction to its byte bound, broken entries, two processes at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from compiled_serve.cache.build_cache import BuildCache, default_cache_root
from compiled_serve.cache.build_key import BuildKey

REPO = Path(__file__).resolve().parents[2]
MIB = 2**20


def _blob(n: int, fill: int = 1) -> dict[str, bytes]:
    return {"blob.bin": bytes([fill]) * n}


def test_root_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COMPILED_SERVE_CACHE_ROOT", str(tmp_path / "moved"))
    assert default_cache_root() == tmp_path / "moved"
    monkeypatch.delenv("COMPILED_SERVE_CACHE_ROOT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "compiled_serve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_root() == tmp_path / "home" / ".cache" / "compiled_serve"


def test_save_then_load_round_trips_and_reports_size(tmp_path: Path, make_key: Callable[..., BuildKey]) -> None:
    cache = BuildCache(tmp_path, max_bytes=10 * MIB)
    key = make_key()
    assert cache.load(key) is None
    cache.save(key, _blob(MIB))
    build = cache.load(key)
    assert build is not None and build.artifacts["blob.bin"] == bytes([1]) * MIB
    assert MIB <= cache.size_bytes() < MIB + 64 * 1024  # the blob plus a small manifest
    assert "1.0 MiB of" in cache.describe() and "(1 build)" in cache.describe()


def test_eviction_keeps_the_bound_and_removes_least_recently_used(tmp_path: Path,
                                                                  make_key: Callable[..., BuildKey]) -> None:
    cache = BuildCache(tmp_path, max_bytes=int(2.5 * MIB))
    a, b, c = (make_key(dtype=d) for d in ("float32", "float16", "bfloat16"))
    cache.save(a, _blob(MIB, 1))
    time.sleep(0.02)
    cache.save(b, _blob(MIB, 2))
    time.sleep(0.02)
    assert cache.load(a) is not None  # a is now more recent than b
    time.sleep(0.02)
    cache.save(c, _blob(MIB, 3))  # 3 MiB > 2.5 MiB: the least recently used (b) goes
    assert cache.load(b) is None
    assert cache.load(a) is not None and cache.load(c) is not None
    assert cache.size_bytes() <= cache.max_bytes
    assert sorted(e.digest for e in cache.entries()) == sorted([a.digest(), c.digest()])


def test_the_build_just_saved_survives_a_bound_smaller_than_itself(tmp_path: Path,
                                                                   make_key: Callable[..., BuildKey]) -> None:
    cache = BuildCache(tmp_path, max_bytes=MIB // 2)
    old, new = make_key(dtype="float32"), make_key(dtype="float16")
    cache.save(old, _blob(MIB))
    cache.save(new, _blob(MIB))
    assert [e.digest for e in cache.entries()] == [new.digest()]


def test_a_tampered_entry_is_a_miss_and_is_discarded(tmp_path: Path, make_key: Callable[..., BuildKey]) -> None:
    cache = BuildCache(tmp_path)
    key = make_key()
    path = cache.save(key, _blob(1024))
    (path / "artifacts" / "blob.bin").write_bytes(b"\x00" * 1024)  # same size, other bytes
    assert cache.load(key) is None
    assert not path.exists() and cache.entries() == []
    cache.save(key, _blob(1024))  # and it can be rebuilt
    assert cache.load(key) is not None


_WRITER = """
from compiled_serve.cache.build_cache import BuildCache
from compiled_serve.cache.build_key import BuildKey
cache = BuildCache({root!r}, max_bytes={bound})
for i in range(6):
    key = BuildKey(model_config={{"layers": 2}}, weight_fingerprint="w", passes=(("p", "u"),), buckets=(1, 2, 4 + i),
                   dtype="float32", device_capability="cpu:x86_64-avx2", torch_version="2.13.0", triton_version=None,
                   compile_mode="graph")
    cache.save(key, {{"blob.bin": bytes([i]) * {size}}})
    build = cache.load(key)
    assert build is None or build.artifacts["blob.bin"] == bytes([i]) * {size}
"""


def test_two_processes_saving_and_evicting_leave_a_sound_cache(tmp_path: Path) -> None:
    """Both write the same six keys (same key, same bytes) under a bound that forces eviction."""
    size, bound = 256 * 1024, 3 * 256 * 1024 + 64 * 1024
    code = _WRITER.format(root=str(tmp_path), bound=bound, size=size)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    cache = BuildCache(tmp_path, max_bytes=bound)
    entries = cache.entries()
    assert entries and cache.size_bytes() <= bound
    for entry in entries:
        assert not cache.store.verify(entry.path), entry
    assert not [n for n in os.listdir(cache.store.root) if n.startswith(".tmp-")]
