"""Per-rank builds of a tensor-parallel engine: one verified build per rank in one build directory.

Each rank compiles its own graph (its shards, its collectives), so each rank has a build of its
own, keyed like any build (`BuildKey`) with `tensor_parallel_size` and `tensor_parallel_rank`
in the key's model config. `ArtifactStore` then verifies every rank's build on its own, as it
verifies a TP=1 build: a rank never trusts bytes its own manifest does not vouch for.

    compiled-serve compile --tensor-parallel-size 2 --build-dir DIR
      rank 0 (the engine's process): the engine's build, saved by `compile_build` as for TP=1;
      rank r > 0 (a worker, started with --record-build): compiles in a fresh Inductor cache of
        its own while torch records its artifacts; when rank 0 sends SAVE_BUILD (the directory as
        bytes), it saves its build itself and answers in `saved.R` beside the rendezvous store.
    compiled-serve serve --tensor-parallel-size 2 --build-dir DIR
      every rank loads its own build before its first compile, with rank 0's policy (`load_build`:
      refused if tampered, a miss refused unless --build-fallback compile). A worker that refuses
      its build exits, and rank 0 raises the worker's error as the same `BuildRefusedError`.

A directory whose builds were made for another TP size (TP=1 included) is refused with a line
that says so, instead of the bare "model_config differs".
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compiled_serve.build.loading import BuildMismatchError, BuildStatus, open_build
from compiled_serve.cache import ArtifactStore, BuildKey
from compiled_serve.cache.build_cache import BuildCache
from compiled_serve.config import EngineConfig

TP_KEYS = ("tensor_parallel_size", "tensor_parallel_rank")

_RECORD_WORKERS: contextvars.ContextVar[bool] = contextvars.ContextVar("record_worker_builds", default=False)


@contextlib.contextmanager
def recording_worker_builds() -> Iterator[None]:
    """While set, a tensor-parallel driver starts its workers with --record-build (`compile`)."""
    token = _RECORD_WORKERS.set(True)
    try:
        yield
    finally:
        _RECORD_WORKERS.reset(token)


def workers_record_builds() -> bool:
    return _RECORD_WORKERS.get()


def tp_key_fields(rank: int, size: int) -> dict[str, int]:
    """What a rank adds to its build key's model config (nothing at TP=1: the old keys stay)."""
    return {"tensor_parallel_size": size, "tensor_parallel_rank": rank} if size > 1 else {}


def rank_build_key(config: EngineConfig, model_config: Any, weight_fingerprint: str, pass_manager: Any,
                   dtype: Any, device: Any, rank: int, size: int) -> BuildKey:
    """A rank's build key, computed as `LLMEngine.build_key` is (a test holds rank 0's equal)."""
    from compiled_serve.engine.buckets import resolve_decode_buckets
    from compiled_serve.passes.logits_tail_pipeline import EnginePasses, logits_tail_pass_manager

    return BuildKey.for_current_toolchain(
        model_config={**model_config.to_dict(), **tp_key_fields(rank, size)},
        weight_fingerprint=weight_fingerprint,
        passes=EnginePasses(pass_manager, logits_tail_pass_manager()).uuids(),
        buckets=resolve_decode_buckets(config.cuda_graph_buckets, config.max_num_seqs),
        dtype=dtype, compile_mode=config.compile_mode, device=device, quantization="none")


def _tp_of(key: BuildKey) -> tuple[int, int]:
    mc = key.model_config
    return int(mc.get("tensor_parallel_size", 1)), int(mc.get("tensor_parallel_rank", 0))


def _without_tp(key: BuildKey) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The key's model config and passes, less what tensor parallelism adds (its keys, its pass)."""
    from compiled_serve.passes.tensor_parallel import TensorParallelPass

    return ({k: v for k, v in key.model_config.items() if k not in TP_KEYS},
            [p for p in key.passes if p[0] != TensorParallelPass.name])


def tp_mismatch(build_dir: str | Path, key: BuildKey) -> str | None:
    """"compiled for tensor_parallel_size 1 ..." when the directory holds builds that differ from
    `key` only in what tensor parallelism changes; None otherwise."""
    size, rank = _tp_of(key)
    ours = _without_tp(key)
    sizes = set()
    for stored in ArtifactStore(build_dir).list():
        other = stored.manifest.key if stored.manifest is not None else None
        if other is not None and set(other.diff(key)) <= {"model_config", "passes"} and _without_tp(other) == ours:
            sizes.add(_tp_of(other)[0])
    sizes.discard(size)
    if not sizes:
        return None
    made = ", ".join(str(s) for s in sorted(sizes))
    return (f"the builds in {build_dir} were compiled for tensor_parallel_size {made}, and this engine runs "
            f"tensor_parallel_size {size} (rank {rank}): run `compiled-serve compile --tensor-parallel-size "
            f"{size} --build-dir {build_dir}` with the same settings")


def open_rank_build(config: EngineConfig, key: BuildKey, cache: BuildCache | None) -> BuildStatus | None:
    """`open_build` for any rank; a miss that is only a TP-size mismatch says so."""
    try:
        return open_build(config, key, cache)
    except BuildMismatchError as exc:
        hint = tp_mismatch(config.build_dir, key) if config.build_dir is not None else None
        if hint is None:
            raise
        raise BuildMismatchError(f"no build in {config.build_dir} matches this engine: {hint}") from exc


def save_rank_build(out_dir: str | Path, key: BuildKey, step_report: Any, rank: int) -> dict[str, Any]:
    """On a worker that compiled while recording: its build, saved into `out_dir`; what rank 0 reads back."""
    from compiled_serve.build.compile import PASS_REPORT_ARTIFACT, pass_report
    from compiled_serve.build.reproducible import normalize_cache_blob
    from compiled_serve.cache.build_key import canonical_json
    from compiled_serve.cache.inductor_artifacts import INDUCTOR_CACHE_ARTIFACT, capture_inductor_artifacts
    from compiled_serve.cache.manifest import Manifest

    artifacts = capture_inductor_artifacts()
    if INDUCTOR_CACHE_ARTIFACT in artifacts:
        artifacts[INDUCTOR_CACHE_ARTIFACT] = normalize_cache_blob(artifacts[INDUCTOR_CACHE_ARTIFACT])
    artifacts[PASS_REPORT_ARTIFACT] = canonical_json(pass_report(step_report))
    report = {"tensor_parallel_rank": rank, "num_graphs": step_report.num_graphs,
              "artifact_bytes": sum(len(v) for v in artifacts.values())}
    path = ArtifactStore(out_dir).save(key, artifacts, report=report)
    return {"rank": rank, "path": str(path), "key": key.to_dict(), "num_artifacts": len(artifacts),
            "manifest_hash": Manifest.build(key, artifacts, report).hash()}


def verify_rank_builds(fresh: list[dict[str, Any]], build_dir: str | Path) -> list[str]:
    """The workers' part of `compile --verify`: each fresh rank build against the stored one."""
    differences = []
    store = ArtifactStore(build_dir)
    for saved in fresh:
        key = BuildKey.from_dict(saved["key"])
        stored = store.load(key)
        if stored is None:
            differences.append(f"rank {saved['rank']}: no stored build {key.digest()[:12]}")
        elif stored.manifest.hash() != saved["manifest_hash"]:
            differences.append(f"rank {saved['rank']}: manifest {stored.manifest.hash()[:12]} stored, "
                               f"{saved['manifest_hash'][:12]} recompiled")
    return differences
