"""Loading a persisted build at engine start-up (`EngineConfig.build_dir`).

Policy, since the user asked for a build directory explicitly:
- a build for exactly this key that verifies (every file's sha256 against the manifest, checked
  by `ArtifactStore.load` before anything is unpickled) is installed into torch's compile caches,
  so the following compile is a warm start: "build <digest> loaded: N artifacts";
- no build for this key (an empty dir, or builds of other inputs) is refused by default:
  `BuildMismatchError` naming what differs from the closest stored build ("dtype differs
  (bfloat16 vs float16)"), so a CI job or a deployment never silently pays a cold compile.
  With `fallback="compile"` (`EngineConfig.build_fallback`, `serve --build-fallback compile`:
  the directory is used as a cache) the engine compiles cold instead and says why;
- a build for this key that is partial, tampered or whose manifest holds another key is always
  refused: `BuildRefusedError`, and the engine does not start (serving a build we cannot trust, or
  silently recompiling over it, would both hide a broken deployment).

Without a build directory the engine may use the build cache (`open_build` with a `BuildCache`):
the same verified load, but a miss or a broken entry just compiles (`compiled_serve.startup`
then stores the new build), since a cache must never stop a start.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from compiled_serve.cache import (
    ArtifactIncompleteError,
    ArtifactMismatchError,
    ArtifactStore,
    ArtifactTamperedError,
    BuildKey,
    InductorArtifactError,
    triton_kernels,
)
from compiled_serve.cache.build_cache import BuildCache
from compiled_serve.cache.inductor_artifacts import INDUCTOR_CACHE_ARTIFACT, install_inductor_artifacts
from compiled_serve.config import EngineConfig
from compiled_serve.errors import CompiledServeError

logger = logging.getLogger("compiled_serve.build")


class BuildRefusedError(CompiledServeError):
    """A build exists for this engine's key but cannot be trusted; it was not loaded."""


class BuildMismatchError(BuildRefusedError):
    """No build in the directory matches this engine's key (and no fallback was asked for)."""


@dataclass
class BuildStatus:
    loaded: bool
    message: str  # for startup_report()
    digest: str | None = None
    num_artifacts: int = 0
    installed: dict[str, list[str]] = field(default_factory=dict)
    cache: BuildCache | None = None  # set when the build came from (or goes to) the build cache
    artifacts: Mapping[str, bytes] | None = None  # a loaded build's artifacts (its precompiled functions)


def _install_inductor_cache(build) -> dict[str, list[str]]:
    """Installs a build's Inductor cache artifact and its compiled Triton kernels, if it has them;
    raises InductorArtifactError."""
    blob = build.artifacts.get(INDUCTOR_CACHE_ARTIFACT)
    installed = install_inductor_artifacts(blob) if blob is not None else {}
    kernels = build.artifacts.get(triton_kernels.TRITON_KERNELS_ARTIFACT)
    if kernels is not None:
        try:
            installed["triton_kernels"] = triton_kernels.install_triton_kernels(kernels, triton_kernels.triton_cache_dir())
        except (ValueError, OSError, tarfile.TarError) as exc:
            raise InductorArtifactError(f"{triton_kernels.TRITON_KERNELS_ARTIFACT}: {exc}") from exc
    return installed


def open_build(config: EngineConfig, key: BuildKey, cache: BuildCache | None) -> BuildStatus | None:
    """What the engine loads before its first compile: the build of `config.build_dir` (the policy
    above), else the build cache's entry for `key`, else nothing (None: no cache, no directory)."""
    if config.build_dir is not None:
        return load_build(config.build_dir, key, fallback=config.build_fallback)
    if cache is None:
        return None
    digest = key.digest()
    build = cache.load(key)
    if build is None:
        logger.info("build cache: no build %s in %s yet; compiling (stored for the next start)",
                    digest[:12], cache.root)
        return BuildStatus(False, f"cache miss: compiled, stored as {digest[:12]}", digest, cache=cache)
    try:
        installed = _install_inductor_cache(build)
    except InductorArtifactError as exc:
        logger.warning("build cache: discarding build %s: %s", digest[:12], exc)
        cache.discard(digest)
        return BuildStatus(False, f"cache miss (unreadable entry): compiled, stored as {digest[:12]}",
                           digest, cache=cache)
    n = len(build.artifacts)
    logger.info("build %s loaded from the build cache %s: %d artifacts", digest[:12], cache.root, n)
    return BuildStatus(True, f"cache hit: build {digest[:12]} loaded ({n} artifacts)", digest, n, installed,
                       cache=cache, artifacts=build.artifacts)


def load_build(build_dir: str | Path, key: BuildKey, fallback: str = "refuse") -> BuildStatus:
    """Verify and install the build of `key` from `build_dir`; see the module docstring.

    `fallback` is what a miss does: "refuse" raises `BuildMismatchError`, "compile" returns a
    not-loaded status so the engine compiles cold."""
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
        if fallback != "compile":
            closest = f"closest stored build vs requested: {why}" if differences else why
            raise BuildMismatchError(
                f"no build in {build_dir} matches this engine ({closest}); run "
                f"`compiled-serve compile --build-dir {build_dir}` with the same settings, or pass "
                "--build-fallback compile (EngineConfig.build_fallback='compile') to compile at start-up instead")
        logger.warning("no matching build in %s (%s): compiling from scratch", build_dir, why)
        return BuildStatus(False, f"no matching build: {why}")
    try:
        installed = _install_inductor_cache(build)
    except InductorArtifactError as exc:
        raise BuildRefusedError(f"refusing build {digest[:12]} in {build_dir}: {exc}") from exc
    n = len(build.artifacts)
    logger.info("build %s loaded from %s: %d artifacts", digest[:12], build_dir, n)
    return BuildStatus(True, f"build {digest[:12]} loaded: {n} artifacts", digest, n, installed,
                       artifacts=build.artifacts)
