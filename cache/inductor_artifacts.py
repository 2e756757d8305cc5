"""Bridge between the artifact store and torch's own compile caches ("mega-cache").

torch.compile keeps several on-disk caches (Inductor's FX graph cache, AOTAutograd's cache,
autotuning results, PGO profiles, and on GPU the Triton kernel bundles). Since torch 2.6,
`torch.compiler.save_cache_artifacts()` returns everything that the compiles in this process
recorded as one portable blob, and `torch.compiler.load_cache_artifacts(blob)` writes it back
into the local caches, so the next `torch.compile` of the same graph is a cache hit
(``counters["inductor"]["fxgraph_cache_hit"]``) instead of a full lowering.

Checked on torch 2.13 (CPU) and 2.11 (the GPU machine), where both functions have these
signatures:

    save_cache_artifacts() -> tuple[bytes, CacheInfo] | None   # None: nothing recorded
    load_cache_artifacts(serialized_artifacts: bytes) -> CacheInfo | None  # None: unreadable

Trust: the blob's container is a length-prefixed byte format, but its entries are pickles.
`load_cache_artifacts` itself unpickles Inductor entries while installing them (Triton
bundles), and later cache hits unpickle the compiled graphs. So a blob must never come from
anywhere but a build that `ArtifactStore.load` has just verified against its manifest's
sha256; this module only takes bytes and never reads files itself.

What a hit saves: dynamo still traces, but AOTAutograd and Inductor lowering/codegen are
skipped. On CPU the generated C++ is still compiled into a shared library on first use in a
fresh cache dir (the blob carries source, not .so files); on GPU the Triton bundle carries
the compiled kernels, which is where most of the time goes.

Notes:
- The recorder is process-global and `save_cache_artifacts()` returns everything recorded
  since the process started, so compile one build inside `recording_compile_artifacts()`
  and capture before leaving it.
- Artifacts are recorded on local cache hits too, so a build compiled from a warm local
  cache still captures a complete blob.
- torch keys its own entries on its version and config; a blob from another toolchain is
  simply a miss, never a wrong hit. `BuildKey` still records the toolchain so such a build
  is reported as mismatched rather than silently recompiled.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from compiled_serve.cache.build_key import canonical_json
from compiled_serve.cache.errors import InductorArtifactError

log = logging.getLogger(__name__)

# Names of the artifacts this bridge contributes to a build.
INDUCTOR_CACHE_ARTIFACT = "torch_compile_cache.bin"
# Which cache entries the blob holds, readable without deserializing it (for `--verify`).
INDUCTOR_CACHE_INDEX = "torch_compile_cache.json"


@contextlib.contextmanager
def recording_compile_artifacts() -> Iterator[None]:
    """Record only the compiles made inside this block (not earlier ones in the process).

    Uses torch's `CacheArtifactManager.with_fresh_cache` (private, present in 2.11-2.13);
    where it is missing the capture falls back to everything the process recorded.
    """
    from torch.compiler._cache import CacheArtifactManager

    fresh = getattr(CacheArtifactManager, "with_fresh_cache", None)
    if fresh is None:
        log.warning("torch has no CacheArtifactManager.with_fresh_cache; capture includes earlier compiles")
        yield
        return
    with fresh():
        yield


def capture_inductor_artifacts() -> dict[str, bytes]:
    """torch's recorded compile-cache artifacts as store artifacts (empty if none were recorded).

    Returns ``{INDUCTOR_CACHE_ARTIFACT: blob, INDUCTOR_CACHE_INDEX: json}``. Empty means
    nothing was compiled, or torch's caches are disabled (e.g. ``TORCHINDUCTOR_FX_GRAPH_CACHE=0``
    or ``torch._inductor.config.force_disable_caches``).
    """
    import torch

    result = torch.compiler.save_cache_artifacts()
    if result is None:
        return {}
    blob, info = result
    index = {kind: sorted(set(keys)) for kind, keys in info.artifacts.items() if keys}
    return {
        INDUCTOR_CACHE_ARTIFACT: bytes(blob),
        INDUCTOR_CACHE_INDEX: canonical_json({"torch_version": torch.__version__, "entries": index}),
    }


def install_inductor_artifacts(blob: bytes) -> dict[str, list[str]]:
    """Hot-load a verified blob into torch's local caches; returns the installed entry keys by kind.

    Pass only bytes from `LoadedBuild.artifacts[INDUCTOR_CACHE_ARTIFACT]`: torch unpickles
    parts of the blob here. The entries land under the current ``TORCHINDUCTOR_CACHE_DIR``,
    which must be writable.
    """
    import torch

    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob must be bytes, got {type(blob).__name__}")
    info = torch.compiler.load_cache_artifacts(bytes(blob))
    if info is None:
        raise InductorArtifactError(
            "torch could not read the compile-cache blob (written by another torch version?); recompile"
        )
    return {kind: sorted(set(keys)) for kind, keys in info.artifacts.items() if keys}
