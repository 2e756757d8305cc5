"""`compiled-serve compile`: build everything a server needs, persist it, verify it.

A compile runs the engine's own start-up (warm-up steps for both graph shapes, and on CUDA the
capture of every decode bucket) while torch records its compile artifacts, in an empty Inductor
cache directory so the build is made from scratch and every entry is recorded. The artifacts
(torch's cache blob + an index + the pass report) are saved under the engine's `BuildKey` with
`ArtifactStore.save`, which is atomic and safe for concurrent compiles into one directory.

`verify_build` recompiles the same inputs from scratch and compares the artifacts: the CI check
that a stored build is what these sources and this toolchain produce. On the CPU a build also
holds the AOT-compiled step and tail (build/precompiled.py); their bytes are not reproducible
(process-local names), so verify compares their index (the variants and the KV-cache geometry)
and not their bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compiled_serve.build.precompiled import recording_precompiled, with_precompiled
from compiled_serve.build.progress import CompileProgress
from compiled_serve.build.reproducible import normalize_cache_blob
from compiled_serve.build.tp_builds import recording_worker_builds, verify_rank_builds
from compiled_serve.cache import ArtifactStore, BuildKey, Manifest
from compiled_serve.cache.build_key import canonical_json
from compiled_serve.cache.inductor_artifacts import (
    INDUCTOR_CACHE_ARTIFACT,
    capture_inductor_artifacts,
    recording_compile_artifacts,
)
from compiled_serve.cache.triton_kernels import TRITON_KERNELS_ARTIFACT, pack_triton_kernels
from compiled_serve.config import EngineConfig
from compiled_serve.errors import CompiledServeError

PASS_REPORT_ARTIFACT = "pass_report.json"
PRECOMPILED_PREFIX = "precompiled-"  # compiled_serve.build.precompiled's per-variant artifacts


class BuildVerifyError(CompiledServeError):
    """`compile --verify` found no build to check, or a recompile that differs from it."""


@dataclasses.dataclass
class CompileResult:
    path: Path
    key: BuildKey
    manifest: Manifest
    artifacts: dict[str, bytes]
    report: dict[str, Any]
    log: list[str]
    # Tensor parallel: the workers' own builds (rank, path, key, manifest_hash), beside rank 0's.
    rank_builds: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def manifest_hash(self) -> str:
        return self.manifest.hash()


@contextlib.contextmanager
def fresh_inductor_cache(config: EngineConfig) -> Iterator[Path]:
    """An empty TORCHINDUCTOR_CACHE_DIR (and so Triton cache) for the duration of the block.

    Its path is a function of the config alone: torch writes the cache path into its artifacts,
    so a random temp name would make two compiles of the same inputs differ. Compiles of the same
    config (concurrent `compile` runs into one store) take turns through a lock on it.
    """
    tag = hashlib.sha256(repr(dataclasses.replace(config, build_dir=None)).encode()).hexdigest()[:16]
    root = Path(tempfile.gettempdir()) / f"compiled-serve-build-{tag}"
    lock_path = root.with_name(root.name + ".lock")
    # Triton's cache too, even where the user pinned one: every kernel the build compiles (ours
    # and Inductor's) lands in root/triton, which the build packs (cache/triton_kernels.py).
    saved = {name: os.environ.get(name) for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    with open(lock_path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root)
        os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
        try:
            yield root
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            shutil.rmtree(root, ignore_errors=True)
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def pass_report(compile_report: Any, tail_report: Any = None) -> dict[str, Any]:
    """The deterministic part of the compile reports (no timings): ops and matches per graph, for
    the model's graphs and the logits tail's."""
    def graphs(report: Any) -> list[dict[str, Any]]:
        return [{k: g[k] for k in ("ops_before", "ops_after", "matches") if k in g} for g in report.graphs]

    result = {"graphs": graphs(compile_report)}
    if tail_report is not None:
        result["logits_tail_graphs"] = graphs(tail_report)
    return result


def build_artifacts(config: EngineConfig, progress: CompileProgress) -> tuple[Any, dict[str, bytes]]:
    """Run the engine's compile from scratch while recording; (engine, artifacts)."""
    import torch

    from compiled_serve.engine.llm_engine import LLMEngine

    with fresh_inductor_cache(config) as root, recording_compile_artifacts(), recording_worker_builds(), \
            recording_precompiled():
        torch._dynamo.reset()
        engine = LLMEngine(dataclasses.replace(config, build_dir=None), on_progress=progress.update)
        artifacts = capture_inductor_artifacts()
        kernels = pack_triton_kernels(root / "triton")  # GPU only: the CPU path compiles no Triton
        if kernels is not None:
            artifacts[TRITON_KERNELS_ARTIFACT] = kernels
    if INDUCTOR_CACHE_ARTIFACT in artifacts:
        artifacts[INDUCTOR_CACHE_ARTIFACT] = normalize_cache_blob(artifacts[INDUCTOR_CACHE_ARTIFACT])
    artifacts[PASS_REPORT_ARTIFACT] = canonical_json(pass_report(engine.compile_report, engine.tail_report))
    # On the CPU, the step and tail AOT-compiled: a warm start skips dynamo (build/precompiled.py).
    return engine, with_precompiled(engine, artifacts)


def compile_build(config: EngineConfig, out_dir: str | Path, show_progress: bool = True) -> CompileResult:
    start = time.perf_counter()
    with CompileProgress(show_progress) as progress:
        engine, artifacts = build_artifacts(config, progress)
        key = engine.build_key
        report = {
            "model": engine.model_source,
            "buckets": list(engine.decode_buckets),
            "load_seconds": round(engine.load_seconds, 2),
            "compile_seconds": round(engine.compile_seconds, 2),
            "total_seconds": round(time.perf_counter() - start, 2),
            "cuda_graphs": engine.startup_report()["cuda_graphs"],
            "num_graphs": engine.compile_report.num_graphs,
            "artifact_bytes": sum(len(v) for v in artifacts.values()),
            "log": list(progress.lines),
        }
        progress.update("saving build")
        path = ArtifactStore(out_dir).save(key, artifacts, report=report)
        try:
            rank_builds = engine.tp.save_worker_builds(str(out_dir)) if engine.tp is not None else []
        finally:
            engine.shutdown()
    manifest = Manifest.build(key, artifacts, report)
    del engine
    return CompileResult(path, key, manifest, artifacts, report, progress.lines, rank_builds)


def verify_build(config: EngineConfig, build_dir: str | Path, show_progress: bool = True) -> tuple[bool, list[str]]:
    """Recompile `config` from scratch and compare with the stored build of the same key.

    Returns (identical, differences). Raises `BuildVerifyError` if there is no stored build to
    compare with; a stored build that fails verification raises the store's typed error.
    """
    with tempfile.TemporaryDirectory(prefix="compiled-serve-verify-") as scratch:
        fresh = compile_build(config, scratch, show_progress)
    stored = ArtifactStore(build_dir).load(fresh.key)
    if stored is None:
        differences = ArtifactStore(build_dir).explain_miss(fresh.key)
        raise BuildVerifyError(f"no build of these inputs in {build_dir}"
                               + (f" ({'; '.join(differences)})" if differences else ""))
    rank_differences = verify_rank_builds(fresh.rank_builds, build_dir)
    if stored.manifest.hash() == fresh.manifest_hash and not rank_differences:
        return True, []
    # The AOT-compiled functions' bytes hold process-local names (dynamo's compiled-function ids),
    # so two compiles never match byte for byte; their index (which variants, for which KV-cache
    # geometry) must, and everything else must match exactly.
    ours = {a.name: a for a in fresh.manifest.artifacts if not a.name.startswith(PRECOMPILED_PREFIX)}
    theirs = {a.name: a for a in stored.manifest.artifacts if not a.name.startswith(PRECOMPILED_PREFIX)}
    if ours == theirs and not rank_differences:
        return True, []
    differences = [f"{name}: {'missing in stored build' if name not in theirs else 'missing in recompile' if name not in ours else 'bytes differ'}"
                   for name in sorted(set(ours) | set(theirs)) if ours.get(name) != theirs.get(name)]
    return False, differences + rank_differences
