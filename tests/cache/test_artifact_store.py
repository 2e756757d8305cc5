"""ArtifactStore: round trip, reproducible manifests, and refusal of every kind of damage.

Each refusal test checks the error type, that the message names the file or field at
fault, and that no bytes came back (load raised instead of returning a partial build).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from compiled_serve.cache.artifact_store import ARTIFACTS_DIR, ArtifactStore
from compiled_serve.cache.build_key import BuildKey
from compiled_serve.cache.errors import (
    ArtifactIncompleteError,
    ArtifactMismatchError,
    ArtifactTamperedError,
    InvalidArtifactNameError,
)
from compiled_serve.cache.manifest import MANIFEST_NAME, ArtifactEntry, Manifest
from compiled_serve.errors import CompiledServeError

MakeKey = Callable[..., BuildKey]


def _rewrite_manifest(build: Path, edit: Callable[[dict], None]) -> None:
    """Edit the manifest like an attacker who also recomputes every hash it carries."""
    doc = json.loads((build / MANIFEST_NAME).read_bytes())
    edit(doc)
    key = BuildKey.from_dict(doc["hashed"]["key"])
    entries = tuple(ArtifactEntry(**e) for e in doc["hashed"]["artifacts"])
    forged = Manifest(key=key, artifacts=entries, report=doc["report"])
    (build / MANIFEST_NAME).write_bytes(forged.to_json())


def test_round_trip(tmp_path: Path, key: BuildKey, artifacts: dict[str, bytes]) -> None:
    store = ArtifactStore(tmp_path)
    path = store.save(key, artifacts, report={"compile_seconds": 12.5})
    assert path == tmp_path / key.digest()
    assert sorted(os.listdir(path)) == sorted([MANIFEST_NAME, ARTIFACTS_DIR])
    loaded = store.load(key)
    assert loaded is not None
    assert dict(loaded.artifacts) == artifacts
    assert loaded.manifest.key == key and loaded.manifest.report["compile_seconds"] == 12.5
    assert store.verify(path) == []
    assert [b.digest for b in store.list()] == [key.digest()]


def test_absent_key_loads_none_and_explains(tmp_path: Path, make_key: MakeKey, artifacts: dict) -> None:
    store = ArtifactStore(tmp_path / "never-created")
    assert store.load(make_key()) is None and store.list() == []
    store.save(make_key(dtype="bfloat16"), artifacts)
    assert store.load(make_key(dtype="float16")) is None
    assert store.explain_miss(make_key(dtype="float16")) == ["dtype differs (bfloat16 vs float16)"]


def test_same_inputs_same_manifest_hash(tmp_path: Path, key: BuildKey, artifacts: dict) -> None:
    # Reports differ (as wall-clock times would); the hashed section must not.
    a = ArtifactStore(tmp_path / "a").save(key, artifacts, report={"compile_seconds": 1.0, "host": "x"})
    # Same artifacts given in another order: the manifest sorts them.
    reordered = dict(reversed(artifacts.items()))
    b = ArtifactStore(tmp_path / "b").save(key, reordered, report={"compile_seconds": 99.0})
    ma = Manifest.from_json((a / MANIFEST_NAME).read_bytes())
    mb = Manifest.from_json((b / MANIFEST_NAME).read_bytes())
    assert ma.hash() == mb.hash()
    assert ma.report != mb.report


def test_second_save_keeps_existing_build(tmp_path: Path, key: BuildKey, artifacts: dict) -> None:
    store = ArtifactStore(tmp_path)
    first = store.save(key, artifacts)
    inode = os.stat(first / MANIFEST_NAME).st_ino
    assert store.save(key, {"model.bin": b"different bytes"}) == first
    assert os.stat(first / MANIFEST_NAME).st_ino == inode
    assert dict(store.load(key).artifacts) == artifacts  # type: ignore[union-attr]


@pytest.mark.parametrize("same_size", [True, False])
def test_flipped_byte_is_tampered(tmp_path: Path, key: BuildKey, artifacts: dict, same_size: bool) -> None:
    store = ArtifactStore(tmp_path)
    path = store.save(key, artifacts)
    target = path / ARTIFACTS_DIR / "model.bin"
    data = bytearray(target.read_bytes())
    if same_size:
        data[5] ^= 0x01
    else:
        data += b"!"
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactTamperedError, match="artifacts/model.bin") as exc:
        store.load(key)
    assert isinstance(exc.value, CompiledServeError)
    assert any("model.bin" in p for p in store.verify(path))


def test_deleted_artifact_is_incomplete(tmp_path: Path, key: BuildKey, artifacts: dict) -> None:
    store = ArtifactStore(tmp_path)
    path = store.save(key, artifacts)
    (path / ARTIFACTS_DIR / "graph.json").unlink()
    with pytest.raises(ArtifactIncompleteError, match="artifacts/graph.json is missing"):
        store.load(key)
    (path / MANIFEST_NAME).unlink()
    with pytest.raises(ArtifactIncompleteError, match="manifest.json is missing"):
        store.load(key)


def test_manifest_edited_to_match_tampered_bytes_is_refused(
    tmp_path: Path, key: BuildKey, artifacts: dict
) -> None:
    store = ArtifactStore(tmp_path)
    path = store.save(key, artifacts)
    evil = b"\x00evil" * 10
    (path / ARTIFACTS_DIR / "model.bin").write_bytes(evil)

    def swap_hash(doc: dict) -> None:
        for e in doc["hashed"]["artifacts"]:
            if e["name"] == "model.bin":
                e["size"], e["sha256"] = len(evil), hashlib.sha256(evil).hexdigest()

    # 1. Naive edit: the manifest's own hash no longer matches its contents.
    doc = json.loads((path / MANIFEST_NAME).read_bytes())
    swap_hash(doc)
    (path / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(ArtifactTamperedError, match="manifest hash does not match"):
        store.load(key)

    # 2. Consistent rewrite that also changes the key: the key no longer matches the request.
    def swap_and_retarget(doc: dict) -> None:
        swap_hash(doc)
        doc["hashed"]["key"]["dtype"] = "float16"

    _rewrite_manifest(path, swap_and_retarget)
    with pytest.raises(ArtifactMismatchError) as exc:
        store.load(key)
    assert exc.value.fields == ["dtype"]

    # 3. Consistent rewrite keeping the key: only a pinned manifest hash can catch this.
    original_hash = Manifest.build(key, artifacts).hash()
    _rewrite_manifest(path, lambda doc: doc["hashed"]["key"].update(dtype=key.dtype))
    with pytest.raises(ArtifactTamperedError, match="pinned"):
        store.load(key, expected_manifest_hash=original_hash)


def test_mismatched_key_names_dtype(tmp_path: Path, make_key: MakeKey, artifacts: dict) -> None:
    store = ArtifactStore(tmp_path)
    saved, wanted = make_key(dtype="bfloat16"), make_key(dtype="float16")
    path = store.save(saved, artifacts)
    os.rename(path, tmp_path / wanted.digest())  # a build copied under the wrong name
    with pytest.raises(ArtifactMismatchError, match=r"dtype differs \(bfloat16 vs float16\)") as exc:
        store.load(wanted)
    assert exc.value.fields == ["dtype"]
    assert any("not the key digest" in p for p in store.verify(tmp_path / wanted.digest()))


@pytest.mark.parametrize("where", ["top", "artifacts"])
def test_unexpected_files_are_refused(tmp_path: Path, key: BuildKey, artifacts: dict, where: str) -> None:
    store = ArtifactStore(tmp_path)
    path = store.save(key, artifacts)
    extra = (path if where == "top" else path / ARTIFACTS_DIR) / "payload.pkl"
    extra.write_bytes(b"cos\nsystem\n")
    with pytest.raises(ArtifactTamperedError, match="unexpected file .*payload.pkl"):
        store.load(key)


def test_symlinked_artifact_is_refused(tmp_path: Path, key: BuildKey, artifacts: dict) -> None:
    store = ArtifactStore(tmp_path / "store")
    path = store.save(key, artifacts)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(artifacts["model.bin"])  # same bytes: only the link itself is wrong
    target = path / ARTIFACTS_DIR / "model.bin"
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(ArtifactTamperedError, match="symlink"):
        store.load(key)


@pytest.mark.parametrize(
    "name", ["../escape", "a/b", "/abs", ".hidden", "", "x" * 200, "a\\b", "caf\u00e9", "a..b", "nul\x00"]
)
def test_bad_artifact_names_rejected(tmp_path: Path, key: BuildKey, name: str) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(InvalidArtifactNameError):
        store.save(key, {name: b"x"})
    assert not tmp_path.exists() or [p for p in os.listdir(tmp_path) if not p.startswith(".")] == []


def test_broken_build_is_replaced_by_next_save(tmp_path: Path, key: BuildKey, artifacts: dict) -> None:
    store = ArtifactStore(tmp_path)
    path = store.save(key, artifacts)
    (path / ARTIFACTS_DIR / "model.bin").write_bytes(b"garbage")
    assert store.save(key, artifacts) == path
    assert dict(store.load(key).artifacts) == artifacts  # type: ignore[union-attr]


def _die_before_publish(root: str, key: BuildKey, artifacts: dict) -> None:
    """A writer killed after writing its temp dir but before the rename."""

    def killed(self: ArtifactStore, tmp: Path, final: Path) -> None:
        os._exit(9)

    ArtifactStore._publish = killed  # type: ignore[method-assign]  # only in this child
    ArtifactStore(root).save(key, artifacts)


def test_partial_build_of_killed_writer_is_ignored_and_cleaned(
    tmp_path: Path, key: BuildKey, artifacts: dict
) -> None:
    proc = multiprocessing.get_context("fork").Process(
        target=_die_before_publish, args=(str(tmp_path), key, artifacts)
    )
    proc.start()
    proc.join(30)
    assert proc.exitcode == 9
    temps = [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    assert (
        len(temps) == 1 and (tmp_path / temps[0] / MANIFEST_NAME).exists()
    )  # fully written, never published

    store = ArtifactStore(tmp_path)
    assert store.load(key) is None and store.list() == []
    assert store.clean_partial() == [tmp_path / temps[0]]
    assert store.save(key, artifacts) == tmp_path / key.digest()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_live_writers_temp_dir_is_not_cleaned(tmp_path: Path, key: BuildKey) -> None:
    store = ArtifactStore(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    with store._lock(key.digest()):  # a writer in progress holds the key's lock
        (tmp_path / f".tmp-{key.digest()}-live").mkdir()
        assert store.clean_partial() == []
    assert store.clean_partial() == [tmp_path / f".tmp-{key.digest()}-live"]


def test_report_must_be_plain_json(tmp_path: Path, key: BuildKey) -> None:
    with pytest.raises(TypeError, match="report"):
        ArtifactStore(tmp_path).save(key, {"a": b"x"}, report={"t": float("nan")})
