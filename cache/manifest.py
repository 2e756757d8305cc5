"""`Manifest`: what a build directory must contain, byte for byte.

The manifest is plain JSON (never pickle) with two sections:

- ``hashed``: the full `BuildKey`, its digest, and each artifact's name, size and sha256.
  `Manifest.hash()` is sha256 over its canonical JSON, so two compiles of the same inputs
  that produce the same bytes produce the same manifest hash, whenever and wherever they ran.
- ``report``: wall-clock compile time, host name, pass match counts... anything useful to
  a human that varies from run to run. It is deliberately *outside* the hash.

The file also records ``manifest_hash``; a reader recomputes it and refuses a manifest whose
hashed section was edited without updating it (see `ArtifactStore.load` for what that does
and does not protect against).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from compiled_serve.cache.build_key import BuildKey, canonical_json
from compiled_serve.cache.errors import (
    ArtifactTamperedError,
    InvalidArtifactNameError,
    InvalidBuildKeyError,
)

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1
# A manifest lists a few files; anything this large is not one of ours.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

# Flat names only: no separators, no leading dot (hidden/temp files), no "..", bounded length.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def validate_artifact_name(name: object) -> str:
    """Return `name` if it is safe to use as a file name inside a build, else raise."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidArtifactNameError(
            f"artifact name {name!r} is not allowed: use 1-128 characters from [A-Za-z0-9_.-], "
            "not starting with '.', without '..' or path separators"
        )
    return name


@dataclasses.dataclass(frozen=True)
class ArtifactEntry:
    """One file of a build: its name (relative to the build's artifact folder) and content hash."""

    name: str
    size: int
    sha256: str

    @classmethod
    def of(cls, name: str, data: bytes) -> ArtifactEntry:
        return cls(validate_artifact_name(name), len(data), hashlib.sha256(data).hexdigest())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A build's key and file list (hashed) plus a free-form report (not hashed)."""

    key: BuildKey
    artifacts: tuple[ArtifactEntry, ...]
    report: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.artifacts, key=lambda a: a.name))
        names = [a.name for a in ordered]
        if len(set(names)) != len(names):
            raise InvalidArtifactNameError(f"duplicate artifact names: {names}")
        object.__setattr__(self, "artifacts", ordered)
        object.__setattr__(self, "report", MappingProxyType(dict(self.report)))

    @classmethod
    def build(
        cls, key: BuildKey, artifacts: Mapping[str, bytes], report: Mapping[str, Any] | None = None
    ) -> Manifest:
        """Describe `artifacts` (name -> bytes) as a build of `key`."""
        for name, data in artifacts.items():
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"artifact {name!r} must be bytes, got {type(data).__name__}")
        entries = tuple(ArtifactEntry.of(name, bytes(data)) for name, data in artifacts.items())
        return cls(key=key, artifacts=entries, report=dict(report or {}))

    @property
    def key_digest(self) -> str:
        return self.key.digest()

    def entry(self, name: str) -> ArtifactEntry | None:
        return next((a for a in self.artifacts if a.name == name), None)

    def hashed_section(self) -> dict[str, Any]:
        return {
            "schema": MANIFEST_SCHEMA,
            "key": self.key.to_dict(),
            "key_digest": self.key_digest,
            "artifacts": [a.to_dict() for a in self.artifacts],
        }

    def hash(self) -> str:
        """sha256 over the canonical hashed section; independent of `report`."""
        return hashlib.sha256(canonical_json(self.hashed_section())).hexdigest()

    def to_json(self) -> bytes:
        doc = {"hashed": self.hashed_section(), "manifest_hash": self.hash(), "report": dict(self.report)}
        try:
            return json.dumps(doc, sort_keys=True, indent=1, allow_nan=False).encode("utf-8") + b"\n"
        except (TypeError, ValueError) as exc:
            raise TypeError(f"manifest report must be plain JSON (no NaN/Inf, no objects): {exc}") from exc

    @classmethod
    def from_json(cls, data: bytes, where: str = "") -> Manifest:
        """Parse and self-check a manifest; any inconsistency is `ArtifactTamperedError`."""

        def refuse(msg: str) -> ArtifactTamperedError:
            return ArtifactTamperedError([f"{MANIFEST_NAME}: {msg}"], where)

        if len(data) > MAX_MANIFEST_BYTES:
            raise refuse(f"{len(data)} bytes is larger than any manifest we write")
        try:
            doc = json.loads(data.decode("utf-8"), parse_constant=_no_constants)
        except (UnicodeDecodeError, ValueError) as exc:
            raise refuse(f"not valid JSON ({exc})") from exc
        if not isinstance(doc, dict) or set(doc) != {"hashed", "manifest_hash", "report"}:
            raise refuse("unexpected top-level layout")
        hashed, report = doc["hashed"], doc["report"]
        if not isinstance(hashed, dict) or set(hashed) != {"schema", "key", "key_digest", "artifacts"}:
            raise refuse("unexpected layout of the hashed section")
        if hashed["schema"] != MANIFEST_SCHEMA:
            raise refuse(
                f"schema {hashed['schema']!r} is not {MANIFEST_SCHEMA} (written by another version?)"
            )
        if not isinstance(report, dict):
            raise refuse("report must be an object")
        try:
            key = BuildKey.from_dict(hashed["key"])
            entries = tuple(_entry_from_dict(e) for e in _as_list(hashed["artifacts"]))
            manifest = cls(key=key, artifacts=entries, report=report)
        except (InvalidBuildKeyError, InvalidArtifactNameError, TypeError, ValueError) as exc:
            raise refuse(str(exc)) from exc
        if hashed["key_digest"] != manifest.key_digest:
            raise refuse("recorded key digest does not match the recorded key")
        if doc["manifest_hash"] != manifest.hash():
            raise refuse("manifest hash does not match its contents (edited after it was written)")
        return manifest


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _as_list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError("artifacts must be a list")
    return value


def _entry_from_dict(d: Any) -> ArtifactEntry:
    if not isinstance(d, dict) or set(d) != {"name", "size", "sha256"}:
        raise TypeError(f"artifact entry must have exactly name/size/sha256, got {d!r}")
    size, digest = d["size"], d["sha256"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise TypeError(f"artifact size must be a non-negative int, got {size!r}")
    if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
        raise TypeError(f"artifact sha256 must be 64 lowercase hex digits, got {digest!r}")
    return ArtifactEntry(validate_artifact_name(d["name"]), size, digest)
