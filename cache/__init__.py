"""The compiled-artifact store: keys, manifests, save/load/verify, and torch's cache bridge.

Import cost is stdlib only; torch is imported lazily by the functions that need it.
"""

from __future__ import annotations

from compiled_serve.cache.artifact_store import ArtifactStore, LoadedBuild, StoredBuild
from compiled_serve.cache.build_key import FORMAT_VERSION, BuildKey, Toolchain, current_toolchain
from compiled_serve.cache.errors import (
    ArtifactIncompleteError,
    ArtifactMismatchError,
    ArtifactStoreError,
    ArtifactTamperedError,
    InductorArtifactError,
    InvalidArtifactNameError,
    InvalidBuildKeyError,
)
from compiled_serve.cache.manifest import ArtifactEntry, Manifest, validate_artifact_name

__all__ = [
    "FORMAT_VERSION",
    "ArtifactEntry",
    "ArtifactIncompleteError",
    "ArtifactMismatchError",
    "ArtifactStore",
    "ArtifactStoreError",
    "ArtifactTamperedError",
    "BuildKey",
    "InductorArtifactError",
    "InvalidArtifactNameError",
    "InvalidBuildKeyError",
    "LoadedBuild",
    "Manifest",
    "StoredBuild",
    "Toolchain",
    "current_toolchain",
    "validate_artifact_name",
]
