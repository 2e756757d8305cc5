"""A build's compiled Triton kernels: packed from the build's Triton cache, installed into another
one, and found there by Triton's own cache reader (its group files name members by absolute path,
which the install rewrites)."""

from __future__ import annotations

import io
import tarfile

import pytest

from compiled_serve.cache.triton_kernels import install_triton_kernels, pack_triton_kernels

triton_cache = pytest.importorskip("triton.runtime.cache")


def _put_kernel(monkeypatch, cache_dir, key: str, name: str) -> dict[str, str]:
    """Writes one kernel the way triton.compile does: its files, then a group naming them."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache_dir))
    manager = triton_cache.FileCacheManager(key)
    paths = {f"{name}.cubin": manager.put(b"\x7fELF" + key.encode(), f"{name}.cubin"),
             f"{name}.json": manager.put(b'{"name": "%s"}' % name.encode(), f"{name}.json", binary=False)}
    manager.put_group(f"{name}.json", paths)
    return paths


def test_kernels_round_trip_into_another_cache_and_triton_finds_them(tmp_path, monkeypatch):
    build_cache, serve_cache = tmp_path / "build" / "triton", tmp_path / "serve" / "triton"
    _put_kernel(monkeypatch, build_cache, "KEYA", "_paged_attention_kernel")
    _put_kernel(monkeypatch, build_cache, "KEYB", "_fused_sample_kernel")
    blob = pack_triton_kernels(build_cache)
    assert blob is not None and blob == pack_triton_kernels(build_cache)  # deterministic bytes
    assert str(tmp_path).encode() not in blob  # the build's absolute paths are not in the artifact

    assert install_triton_kernels(blob, serve_cache) == ["KEYA", "KEYB"]
    monkeypatch.setenv("TRITON_CACHE_DIR", str(serve_cache))
    group = triton_cache.FileCacheManager("KEYA").get_group("_paged_attention_kernel.json")
    assert group is not None, "Triton's reader does not resolve the installed group"
    assert set(group) == {"_paged_attention_kernel.cubin", "_paged_attention_kernel.json"}
    assert all(p.startswith(str(serve_cache)) for p in group.values())
    with open(group["_paged_attention_kernel.cubin"], "rb") as f:
        assert f.read() == b"\x7fELFKEYA"
    assert install_triton_kernels(blob, serve_cache) == []  # present already: left as it is


def test_an_empty_cache_packs_nothing(tmp_path):
    assert pack_triton_kernels(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert pack_triton_kernels(tmp_path / "empty") is None


@pytest.mark.parametrize("name", ["../evil/x.cubin", "KEY/sub/x.cubin", "/abs/x.cubin", "flat.cubin"])
def test_members_outside_one_kernel_directory_are_refused(tmp_path, name):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="unexpected member"):
        install_triton_kernels(buf.getvalue(), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before anything was written
