"""`ArtifactStore`: persist compiled builds so a server starts from files, not from a compile.

Layout under `root`::

    <key digest>/manifest.json        written last; its presence marks a finished build
    <key digest>/artifacts/<name>     one file per artifact, flat
    .tmp-<key digest>-<random>/       a build being written (or left by a killed writer)
    .locks/<key digest>.lock          fcntl lock serializing writers of one key

Why it is safe to share one root between processes:
- A build becomes visible only through one atomic `rename` of a fully written, fsynced
  temp directory, so a reader sees either nothing or a complete build, never half of one.
- Writers of the same key take an exclusive `flock`; the second one finds the first's
  complete build and keeps it. The lock is advisory, so publishing does not rely on it
  alone: `rename` onto a non-empty directory fails, and a writer that loses that race
  discards its copy and keeps the winner's. (Filesystems where flock is a no-op are not
  supported: there, stale-temp cleanup could not tell a live writer from a dead one.)
- A temp directory exists only while its writer holds the key's lock, so one whose lock can
  be taken belongs to a dead writer and is removed (`clean_partial`).

Why loading is safe: nothing in the store is unpickled. `load` checks the key, the exact
set of files, and every size and sha256 against the manifest *before* handing back any
bytes. Those bytes may later reach torch's cache loader, which does unpickle
(see `inductor_artifacts.py`); that is why verification comes first and is all-or-nothing.
The manifest is self-hashed, which catches corruption and inconsistent edits; someone who can
rewrite the whole directory consistently can still forge a build, so deployments that need
that guarantee pin the manifest hash they trust (`load(..., expected_manifest_hash=...)`).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from compiled_serve.cache.build_inspection import ARTIFACTS_DIR, inspect_build, read_capped
from compiled_serve.cache.build_key import BuildKey
from compiled_serve.cache.errors import (
    ArtifactIncompleteError,
    ArtifactMismatchError,
    ArtifactTamperedError,
)
from compiled_serve.cache.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"
_LOCK_DIR = ".locks"
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class LoadedBuild:
    """A verified build: every byte here matched the manifest's sha256."""

    path: Path
    manifest: Manifest
    artifacts: Mapping[str, bytes]


class StoredBuild(NamedTuple):
    """One entry of `ArtifactStore.list()`; `manifest` is None if it could not be read."""

    digest: str
    path: Path
    manifest: Manifest | None
    problem: str | None


class ArtifactStore:
    """A directory of compiled builds keyed by `BuildKey.digest()`."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def path_for(self, key: BuildKey) -> Path:
        return self.root / key.digest()

    # ---------------------------------------------------------------- save
    def save(
        self, key: BuildKey, artifacts: Mapping[str, bytes], report: Mapping[str, Any] | None = None
    ) -> Path:
        """Write a build of `key` and return its directory.

        If a complete, verified build of the same key is already there it is kept and its
        path returned (same key means an equivalent build; first writer wins).
        """
        manifest = Manifest.build(key, artifacts, report)  # validates names before any I/O
        manifest_bytes = manifest.to_json()
        digest = key.digest()
        final = self.root / digest
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_partial()
        with self._lock(digest):
            # We hold the key's lock, so any temp dir of this key is a dead writer's.
            self._remove_temps(digest)
            if os.path.lexists(final):
                problems = self.verify(final)
                if not problems:
                    self._note_kept(final, manifest)
                    return final
                log.warning("replacing broken build %s: %s", final, "; ".join(problems))
                self._discard(final, digest)
            tmp = self._write_temp(digest, manifest, artifacts, manifest_bytes)
            self._publish(tmp, final)
        return final

    def _note_kept(self, final: Path, ours: Manifest) -> None:
        with contextlib.suppress(Exception):
            theirs = self._read_manifest(final)
            if theirs.hash() != ours.hash():
                log.info(
                    "kept existing build %s (manifest %s); this compile's artifacts differ (%s): "
                    "the compiler is not bit-reproducible for this key",
                    final,
                    theirs.hash()[:12],
                    ours.hash()[:12],
                )

    def _write_temp(
        self, digest: str, manifest: Manifest, artifacts: Mapping[str, bytes], manifest_bytes: bytes
    ) -> Path:
        tmp = self.root / f"{_TMP_PREFIX}{digest}-{secrets.token_hex(8)}"
        os.mkdir(tmp)
        try:
            art_dir = tmp / ARTIFACTS_DIR
            os.mkdir(art_dir)
            for entry in manifest.artifacts:
                _write_file(art_dir / entry.name, bytes(artifacts[entry.name]))
            _fsync_dir(art_dir)
            # The manifest goes last: a build dir without one is never mistaken for complete.
            _write_file(tmp / MANIFEST_NAME, manifest_bytes)
            _fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def _publish(self, tmp: Path, final: Path) -> None:
        """Atomically move `tmp` to `final`; if another writer got there first, keep theirs."""
        try:
            os.rename(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and not self.verify(final):
                return
            raise
        _fsync_dir(self.root)

    def _discard(self, build: Path, digest: str) -> None:
        # Rename first so readers never see a half-deleted build under the real name.
        trash = self.root / f"{_TMP_PREFIX}{digest}-{secrets.token_hex(8)}"
        os.rename(build, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # ---------------------------------------------------------------- partial builds
    def clean_partial(self) -> builtins.list[Path]:
        """Remove temp dirs left by killed writers; return what was removed.

        A temp dir whose key lock we can take right now has no live writer.
        """
        removed: builtins.list[Path] = []
        if not self.root.is_dir():
            return removed
        digests = {
            name[len(_TMP_PREFIX) :][:64] for name in os.listdir(self.root) if name.startswith(_TMP_PREFIX)
        }
        for digest in sorted(digests):
            if not _DIGEST_RE.fullmatch(digest):
                continue
            with self._lock(digest, blocking=False) as held:
                if held:
                    removed += self._remove_temps(digest)
        return removed

    def _remove_temps(self, digest: str) -> builtins.list[Path]:
        removed = []
        for name in os.listdir(self.root):
            if name.startswith(f"{_TMP_PREFIX}{digest}-"):
                shutil.rmtree(self.root / name, ignore_errors=True)
                removed.append(self.root / name)
                log.info("removed partial build %s", self.root / name)
        return removed

    @contextlib.contextmanager
    def _lock(self, digest: str, blocking: bool = True) -> Iterator[bool]:
        lock_dir = self.root / _LOCK_DIR
        lock_dir.mkdir(exist_ok=True)
        # Lock files are never deleted: unlinking one while another process waits on it
        # would let two writers each hold "the" lock.
        fd = os.open(lock_dir / f"{digest}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # ---------------------------------------------------------------- load / verify
    def load(self, key: BuildKey, *, expected_manifest_hash: str | None = None) -> LoadedBuild | None:
        """The verified build of `key`, or None if there is none.

        Raises `ArtifactMismatchError` (naming the differing key fields),
        `ArtifactTamperedError` or `ArtifactIncompleteError`; in those cases no bytes are
        returned at all. Temp dirs of unfinished writes are never looked at.
        """
        build = self.path_for(key)
        if not os.path.lexists(build):
            return None
        found = inspect_build(build, key=key, keep_bytes=True, expected_manifest_hash=expected_manifest_hash)
        if found.mismatch:
            raise ArtifactMismatchError(found.mismatch_fields, found.mismatch, str(build))
        if found.tampered:
            raise ArtifactTamperedError(found.tampered + found.incomplete, str(build))
        if found.incomplete:
            raise ArtifactIncompleteError(found.incomplete, str(build))
        assert found.manifest is not None
        return LoadedBuild(build, found.manifest, found.data)

    def verify(self, path: Path | str) -> builtins.list[str]:
        """Every problem with the build directory at `path` (empty list: it is intact)."""
        return inspect_build(Path(path), key=None, keep_bytes=False).problems()

    def _read_manifest(self, build: Path) -> Manifest:
        return Manifest.from_json(read_capped(build / MANIFEST_NAME, MAX_MANIFEST_BYTES), str(build))

    # ---------------------------------------------------------------- listing
    def explain_miss(self, key: BuildKey) -> builtins.list[str]:
        """Why `key` has no build: the differences to the closest stored build (empty if none).

        Lets `compile`/`serve` say "mismatched build: dtype differs (bfloat16 vs float16)"
        instead of silently recompiling. Lines read "stored vs requested".
        """
        best: builtins.list[str] = []
        best_n = None
        for build in self.list():
            if build.manifest is None or build.manifest.key == key:
                continue
            fields = build.manifest.key.diff(key)
            if best_n is None or len(fields) < best_n:
                best_n, best = len(fields), build.manifest.key.describe_diff(key)
        return best

    def list(self) -> builtins.list[StoredBuild]:
        """Finished builds under root (manifests parsed, artifact bytes not checked: see `verify`)."""
        out: builtins.list[StoredBuild] = []
        if not self.root.is_dir():
            return out
        for name in sorted(os.listdir(self.root)):
            if not _DIGEST_RE.fullmatch(name):
                continue
            path = self.root / name
            try:
                out.append(StoredBuild(name, path, self._read_manifest(path), None))
            except (OSError, ArtifactTamperedError) as exc:
                out.append(StoredBuild(name, path, None, str(exc)))
        return out


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
