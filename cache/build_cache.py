"""`BuildCache`: the default home of builds, so a second start of the same settings is a load.

`serve`, `chat` and the offline `LLM` keep their builds here unless told otherwise
(`--build-dir DIR` names a directory of their own; `--no-build-cache` keeps nothing)::

    $COMPILED_SERVE_CACHE_ROOT  (default ~/.cache/compiled_serve, or $XDG_CACHE_HOME/compiled_serve)
        builds/                 an `ArtifactStore`: verified, atomic, safe to share between processes
        builds/.used/<digest>   touched on every save and load; its mtime orders the LRU eviction
        builds/.locks/evict.lock

The cache is bounded in bytes (`max_bytes`). After a save, `evict` removes the least recently
used builds until the total is under the bound; the build just saved is never removed, and a
build whose key lock is held (being written) is skipped. A build is renamed away before it is
deleted, so a concurrent reader sees the whole build or none of it (and a reader that loses
that race treats it as a miss).

Unlike an explicit `--build-dir` (a deployment: a broken build stops the engine), a cache entry
that fails verification is discarded and rebuilt: a cache must never stop a start.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from compiled_serve.cache.artifact_store import ArtifactStore, LoadedBuild
from compiled_serve.cache.build_key import BuildKey
from compiled_serve.cache.errors import ArtifactStoreError

log = logging.getLogger(__name__)

CACHE_ROOT_ENV = "COMPILED_SERVE_CACHE_ROOT"
DEFAULT_MAX_BYTES = 4 * 2**30
_USED_DIR = ".used"


def default_cache_root() -> Path:
    """$COMPILED_SERVE_CACHE_ROOT, else $XDG_CACHE_HOME/compiled_serve, else ~/.cache/compiled_serve."""
    explicit = os.environ.get(CACHE_ROOT_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "compiled_serve"


class CachedBuild(NamedTuple):
    digest: str
    path: Path
    size_bytes: int
    last_used: float


class BuildCache:
    """An `ArtifactStore` under the cache root, with LRU bookkeeping and a size bound."""

    def __init__(self, root: Path | str | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root) if root is not None else default_cache_root()
        self.max_bytes = max_bytes
        self.store = ArtifactStore(self.root / "builds")

    # ------------------------------------------------------------ load / save
    def load(self, key: BuildKey) -> LoadedBuild | None:
        """The verified build of `key`, or None: a miss, or an entry that failed verification
        (discarded, so the caller rebuilds it)."""
        try:
            build = self.store.load(key)
        except ArtifactStoreError as exc:
            log.warning("discarding cached build %s: %s", key.digest()[:12], exc)
            self.discard(key.digest())
            return None
        except FileNotFoundError:  # evicted by another process while we read it
            return None
        if build is not None:
            self._touch(key.digest())
        return build

    def save(self, key: BuildKey, artifacts: Mapping[str, bytes], report: Mapping[str, Any] | None = None) -> Path:
        """Store a build (atomic; the first of concurrent writers wins), then evict to the bound."""
        path = self.store.save(key, artifacts, report)
        self._touch(key.digest())
        self.evict(keep={key.digest()})
        return path

    # ------------------------------------------------------------ size and eviction
    def entries(self) -> list[CachedBuild]:
        """Finished builds, least recently used first."""
        out = []
        for build in self.store.list():
            used = self._used_path(build.digest)
            try:
                last_used = used.stat().st_mtime
            except FileNotFoundError:
                last_used = 0.0  # never touched (written by `compile` into this dir): oldest
            out.append(CachedBuild(build.digest, build.path, _tree_bytes(build.path), last_used))
        return sorted(out, key=lambda b: (b.last_used, b.digest))

    def size_bytes(self) -> int:
        return sum(b.size_bytes for b in self.entries())

    def evict(self, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Remove least recently used builds until the total is at most `max_bytes`; returns the
        digests removed. Builds in `keep`, or being written by another process, stay."""
        removed: list[str] = []
        with self._evict_lock():
            entries = self.entries()
            total = sum(b.size_bytes for b in entries)
            for build in entries:
                if total <= self.max_bytes:
                    break
                if build.digest in keep:
                    continue
                if self.discard(build.digest):
                    total -= build.size_bytes
                    removed.append(build.digest)
        for digest in removed:
            log.info("evicted cached build %s (least recently used; cache bound %.1f GiB)",
                     digest[:12], self.max_bytes / 2**30)
        return removed

    def discard(self, digest: str) -> bool:
        """Remove one build, unless its writer holds the key lock now."""
        with self.store._lock(digest, blocking=False) as held:
            if not held:
                return False
            path = self.store.root / digest
            if not os.path.lexists(path):
                return False
            self.store._discard(path, digest)
            with contextlib.suppress(FileNotFoundError):
                self._used_path(digest).unlink()
        return True

    def describe(self) -> str:
        """For the startup summary: "1.2 GiB of 4.0 GiB in /root/.cache/compiled_serve (3 builds)"."""
        entries = self.entries()
        size = sum(b.size_bytes for b in entries)
        return (f"{_gib(size)} of {_gib(self.max_bytes)} in {self.root} "
                f"({len(entries)} build{'s' if len(entries) != 1 else ''})")

    # ------------------------------------------------------------ internals
    def _used_path(self, digest: str) -> Path:
        return self.store.root / _USED_DIR / digest

    def _touch(self, digest: str) -> None:
        used = self._used_path(digest)
        used.parent.mkdir(parents=True, exist_ok=True)
        used.touch()
        now = time.time()
        os.utime(used, (now, now))

    @contextlib.contextmanager
    def _evict_lock(self) -> Iterator[None]:
        lock_dir = self.store.root / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_dir / "evict.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"

