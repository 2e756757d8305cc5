"""Checking a build directory against its manifest, byte for byte, before any use.

Kept apart from the store's write path because it is the security boundary: everything
`ArtifactStore.load` returns passed through `inspect_build`, which reads every file (never
through a symlink), compares sizes and sha256 with the manifest, and refuses files the
manifest does not list. Problems are collected rather than raised one at a time, so
`compile --verify` can print all of them; `load` maps them to one typed error.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import stat
from pathlib import Path

from compiled_serve.cache.build_key import BuildKey
from compiled_serve.cache.errors import ArtifactTamperedError
from compiled_serve.cache.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest

ARTIFACTS_DIR = "artifacts"


@dataclasses.dataclass
class BuildInspection:
    """What `inspect_build` found; problems are grouped by the error each one maps to."""

    manifest: Manifest | None = None
    data: dict[str, bytes] = dataclasses.field(default_factory=dict)
    mismatch_fields: list[str] = dataclasses.field(default_factory=list)
    mismatch: list[str] = dataclasses.field(default_factory=list)
    tampered: list[str] = dataclasses.field(default_factory=list)
    incomplete: list[str] = dataclasses.field(default_factory=list)

    def problems(self) -> list[str]:
        return self.mismatch + self.tampered + self.incomplete


def inspect_build(
    build: Path, *, key: BuildKey | None, keep_bytes: bool, expected_manifest_hash: str | None = None
) -> BuildInspection:
    """Check a build directory against its manifest (and `key`, if given), reading every byte."""
    found = BuildInspection()
    st = _lstat(build)
    if st is None:
        found.incomplete.append(f"{build.name}: build directory is missing")
        return found
    if not stat.S_ISDIR(st.st_mode):
        found.tampered.append(f"{build.name}: not a directory (symlink or file)")
        return found
    try:
        manifest = Manifest.from_json(read_capped(build / MANIFEST_NAME, MAX_MANIFEST_BYTES))
    except FileNotFoundError:
        found.incomplete.append(f"{MANIFEST_NAME} is missing")
        return found
    except OSError as exc:
        found.tampered.append(f"{MANIFEST_NAME} cannot be read ({exc.strerror or exc})")
        return found
    except ArtifactTamperedError as exc:
        found.tampered.extend(exc.problems)
        return found
    found.manifest = manifest
    if key is not None and manifest.key != key:
        found.mismatch_fields = manifest.key.diff(key)
        # Read "stored vs requested" in the message.
        found.mismatch = manifest.key.describe_diff(key)
        return found
    if manifest.key_digest != build.name:
        found.mismatch.append(f"directory name {build.name} is not the key digest {manifest.key_digest}")
        found.mismatch_fields = []
        return found
    if expected_manifest_hash is not None and manifest.hash() != expected_manifest_hash:
        found.tampered.append(f"manifest hash {manifest.hash()} is not the pinned {expected_manifest_hash}")
        return found

    for extra in sorted(set(os.listdir(build)) - {MANIFEST_NAME, ARTIFACTS_DIR}):
        found.tampered.append(f"unexpected file {extra}")
    art_dir = build / ARTIFACTS_DIR
    st = _lstat(art_dir)
    if st is None:
        found.incomplete.extend(f"{ARTIFACTS_DIR}/{e.name} is missing" for e in manifest.artifacts)
        return found
    if not stat.S_ISDIR(st.st_mode):
        found.tampered.append(f"{ARTIFACTS_DIR} is not a directory")
        return found
    expected = {e.name for e in manifest.artifacts}
    for extra in sorted(set(os.listdir(art_dir)) - expected):
        found.tampered.append(f"unexpected file {ARTIFACTS_DIR}/{extra}")
    for entry in manifest.artifacts:
        rel = f"{ARTIFACTS_DIR}/{entry.name}"
        try:
            data = read_capped(art_dir / entry.name, entry.size)
        except FileNotFoundError:
            found.incomplete.append(f"{rel} is missing")
            continue
        except _TooLarge:
            found.tampered.append(f"{rel} is larger than the {entry.size} bytes the manifest records")
            continue
        except OSError as exc:
            found.tampered.append(f"{rel} cannot be read ({exc.strerror or exc}; symlinks are refused)")
            continue
        if len(data) != entry.size:
            found.tampered.append(f"{rel} has {len(data)} bytes, the manifest records {entry.size}")
        elif hashlib.sha256(data).hexdigest() != entry.sha256:
            found.tampered.append(f"{rel} sha256 does not match the manifest")
        elif keep_bytes:
            found.data[entry.name] = data
    if found.tampered or found.incomplete:
        found.data.clear()
    return found


class _TooLarge(Exception):
    pass


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def read_capped(path: Path, limit: int) -> bytes:
    """Read a regular file (never through a symlink) of at most `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        if path.name == MANIFEST_NAME:
            return data  # Manifest.from_json reports the size problem with context.
        raise _TooLarge(path)
    return data
