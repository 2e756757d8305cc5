"""Four processes save the same key into one root at once: one intact build must result.

Each writer saves *different* bytes (as a non-reproducible compile would), so a store that
mixed files from two writers would fail verification instead of passing by coincidence.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.synchronize import Barrier
from pathlib import Path

from compiled_serve.cache.artifact_store import ArtifactStore
from compiled_serve.cache.build_key import BuildKey
from compiled_serve.cache.manifest import MANIFEST_NAME

WRITERS = 4


def _writer_artifacts(writer: int) -> dict[str, bytes]:
    # ~1 MiB per file widens the window in which writers overlap.
    return {f"part{i}.bin": bytes([writer]) * (1 << 20) for i in range(3)}


def _save_then_load(
    root: str, key: BuildKey, writer: int, barrier: Barrier, results: multiprocessing.Queue
) -> None:
    store = ArtifactStore(root)
    barrier.wait(timeout=30)
    try:
        path = store.save(key, _writer_artifacts(writer))
        loaded = store.load(key)
        assert loaded is not None
        owners = {data[0] for data in loaded.artifacts.values()}
        results.put(("ok", str(path), loaded.manifest.hash(), sorted(owners)))
    except BaseException as exc:  # report, don't hang the parent
        results.put(("error", repr(exc), "", []))


def test_concurrent_saves_of_one_key_leave_one_intact_build(tmp_path: Path, key: BuildKey) -> None:
    ctx = multiprocessing.get_context("fork")  # the store is pure file I/O: no torch state in children
    barrier, results = ctx.Barrier(WRITERS), ctx.Queue()
    procs = [
        ctx.Process(target=_save_then_load, args=(str(tmp_path), key, w, barrier, results))
        for w in range(WRITERS)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0

    assert [o for o in outcomes if o[0] != "ok"] == []
    assert {o[1] for o in outcomes} == {str(tmp_path / key.digest())}
    assert len({o[2] for o in outcomes}) == 1, "every process must load the same (first) build"
    assert all(len(o[3]) == 1 for o in outcomes), "files from several writers were mixed"

    store = ArtifactStore(tmp_path)
    assert [b.digest for b in store.list()] == [key.digest()]
    assert store.verify(tmp_path / key.digest()) == []
    assert sorted(p for p in os.listdir(tmp_path) if not p.startswith(".locks")) == [key.digest()]
    assert store.load(key) is not None


def test_losing_the_rename_keeps_the_winner(tmp_path: Path, key: BuildKey) -> None:
    """If two writers ever both reach publish, the rename decides and the loser's copy goes."""
    store = ArtifactStore(tmp_path)
    winner = store.save(key, _writer_artifacts(1))
    manifest_before = (winner / MANIFEST_NAME).read_bytes()
    loser_tmp = store._write_temp(key.digest(), *_manifest_args(key, _writer_artifacts(2)))
    store._publish(loser_tmp, winner)
    assert not loser_tmp.exists()
    assert (winner / MANIFEST_NAME).read_bytes() == manifest_before
    assert store.verify(winner) == []


def _manifest_args(key: BuildKey, artifacts: dict[str, bytes]) -> tuple:
    from compiled_serve.cache.manifest import Manifest

    m = Manifest.build(key, artifacts)
    return m, artifacts, m.to_json()
