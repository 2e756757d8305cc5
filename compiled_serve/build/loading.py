"""Loading a persisted build at engine start-up (`EngineConfig.build_dir`).

Policy, since the user asked for a build directory explicitly:
- a build for exactly this key that verifies (every file's sha256 against the manifest, checked
  by `ArtifactStore.load` before anything is unpickled) is installed into torch's compile caches,
  so the following compile is a warm start: "build <digest> loaded: N artifacts";
- no build for this key (an empty dir, or builds of other inputs) is a miss, not an error: the
  engine compiles cold and says why, "no matching build: dtype differs (bfloat16 vs float16)";
- a build for this key that is partial, tampered or whose manifest holds another key is refused:
  `BuildRefusedError`, and the engine does not start (serving a build we cannot trust, or
  silently recompiling over it, would both hide a broken deployment).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from compiled_serve.cache import (
    ArtifactIncompleteError,
    ArtifactMismatchError,
    ArtifactStore,
    ArtifactTamperedError,
    BuildKey,
    InductorArtifactError,
)
from compiled_serve.cache.inductor_artifacts import INDUCTOR_CACHE_ARTIFACT, install_inductor_artifacts
from compiled_serve.errors import CompiledServeError

logger = logging.getLogger("compiled_serve.build")


class BuildRefusedError(CompiledServeError):
    """A build exists for this engine's key but cannot be trusted; it was not loaded."""


@dataclass
class BuildStatus:
    loaded: bool
    message: str  # for startup_report()
    digest: str | None = None
    num_artifacts: int = 0
    installed: dict[str, list[str]] = field(default_factory=dict)


def load_build(build_dir: str | Path, key: BuildKey) -> BuildStatus:
    """Verify and install the build of `key` from `build_dir`; see the module docstring."""
    store = ArtifactStore(build_dir)
    digest = key.digest()
    try:
        build = store.load(key)
    except (ArtifactTamperedError, ArtifactIncompleteError, ArtifactMismatchError) as exc:
        raise BuildRefusedError(
            f"refusing build {digest[:12]} in {build_dir}: {exc}; delete it and run `compiled-serve compile`"
        ) from exc
    if build is None:
        differences = store.explain_miss(key)
        why = "; ".join(differences) if differences else f"{build_dir} has no builds"
        logger.warning("no matching build in %s (%s): compiling from scratch", build_dir, why)
        return BuildStatus(False, f"no matching build: {why}")
    blob = build.artifacts.get(INDUCTOR_CACHE_ARTIFACT)
    installed: dict[str, list[str]] = {}
    if blob is not None:
        try:
            installed = install_inductor_artifacts(blob)
        except InductorArtifactError as exc:
            raise BuildRefusedError(f"refusing build {digest[:12]} in {build_dir}: {exc}") from exc
    n = len(build.artifacts)
    logger.info("build %s loaded from %s: %d artifacts", digest[:12], build_dir, n)
    return BuildStatus(True, f"build {digest[:12]} loaded: {n} artifacts", digest, n, installed)
