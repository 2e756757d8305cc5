"""Per-rank builds (build/tp_builds.py) on the CPU with gloo: `compile --tensor-parallel-size 2` writes
one verified build per rank, an engine with tensor_parallel_size=2 and build_dir loads them on every
rank (offline `LLM`) and gives TP=1's greedy tokens; a TP=1 build is refused by a TP=2 engine (and the other way
round) with an error that names the TP sizes; a tampered rank-1 artifact is refused by rank 1's
verification, raised on rank 0 as a BuildRefusedError. compile_mode="graph": the build holds the
pass report of each rank (the Inductor blob is covered by tests/build's heavy tests)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist

from compiled_serve.build import BuildMismatchError, BuildRefusedError
from compiled_serve.build.command import main as compile_main
from compiled_serve.build.tp_builds import rank_build_key
from compiled_serve.cache import ArtifactStore
from compiled_serve.config import EngineConfig
from compiled_serve.engine.llm_engine import LLMEngine
from compiled_serve.sampling_params import SamplingParams

TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5}
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
FLAGS = ["--load-format", "dummy", "--dtype", "float32", "--device", "cpu", "--compile-mode", "graph",
         "--num-kv-blocks", "64", "--max-num-seqs", "4", "--no-progress"]


def _config(model: str, tp: int, build_dir: Path | None = None) -> EngineConfig:
    return EngineConfig(model=model, load_format="dummy", dtype="float32", device="cpu", compile_mode="graph",
                        num_kv_blocks=64, max_num_seqs=4, tensor_parallel_size=tp, build_cache=False,
                        build_dir=None if build_dir is None else str(build_dir))


def _tokens(engine: LLMEngine) -> dict:
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, greedy, output_kind="final")
    out = {}
    while engine.has_unfinished_requests():
        out.update({o.request_id: o.outputs[0].token_ids for o in engine.step()})
    return out


def _start_fails(config: EngineConfig, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        LLMEngine(config)
    assert not dist.is_initialized()  # the failed start shut its workers and its process group down


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[str, Path, dict]:
    """`compiled-serve compile --tensor-parallel-size 2` into a build dir; the TP=1 engine's tokens."""
    root = tmp_path_factory.mktemp("tp-builds")
    model = root / "config.json"
    model.write_text(json.dumps(TINY))
    builds = root / "tp2"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert compile_main(["compile", "--model", str(model), *FLAGS, "--tensor-parallel-size", "2",
                             "--build-dir", str(builds)]) == 0
    assert "tensor-parallel rank 1: build" in printed.getvalue(), printed.getvalue()
    one = LLMEngine(_config(str(model), 1))
    try:
        want = _tokens(one)
    finally:
        one.shutdown()
    return str(model), builds, want


def test_compile_writes_one_verified_build_per_rank_and_every_rank_loads_its_own(compiled):
    model, builds, want = compiled
    stored = ArtifactStore(builds).list()
    ranks = sorted(b.manifest.key.model_config["tensor_parallel_rank"] for b in stored)
    assert ranks == [0, 1] and all(b.manifest.key.model_config["tensor_parallel_size"] == 2 for b in stored)
    assert all(ArtifactStore(builds).verify(b.path) == [] for b in stored)
    # `compile --verify`: a recompile gives every rank's manifest.
    assert compile_main(["compile", "--model", model, *FLAGS, "--tensor-parallel-size", "2",
                         "--verify", str(builds)]) == 0
    from compiled_serve import LLM

    config = _config(model, 2, builds)
    llm = LLM(**{f: getattr(config, f) for f in ("model", "load_format", "dtype", "device", "compile_mode",
                                                  "num_kv_blocks", "max_num_seqs", "tensor_parallel_size",
                                                  "build_cache", "build_dir")})
    engine = llm.llm_engine
    try:
        digests = {b.manifest.key.model_config["tensor_parallel_rank"]: b.digest[:12] for b in stored}
        message = engine.startup_report()["build"]
        assert f"rank 0: build {digests[0]} loaded" in message and f"rank 1: build {digests[1]} loaded" in message
        # The worker keys its build as the engine does: rank 0's key from the same function is the engine's.
        assert rank_build_key(engine.config, engine.model_config, engine.weight_fingerprint, engine.pass_manager,
                              engine.dtype, engine.device, 0, 2) \
            == engine.build_key
        greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        got = {f"r{i}": o.outputs[0].token_ids for i, o in enumerate(llm.generate(PROMPTS, greedy))}
        assert got == want
    finally:
        engine.shutdown()


def test_a_build_for_another_tensor_parallel_size_is_refused(compiled, tmp_path):
    model, builds, _ = compiled
    assert compile_main(["compile", "--model", model, *FLAGS, "--build-dir", str(tmp_path / "tp1")]) == 0
    _start_fails(_config(model, 2, tmp_path / "tp1"), BuildMismatchError,
                 r"compiled for tensor_parallel_size 1, and this engine runs tensor_parallel_size 2 \(rank 0\)")
    _start_fails(_config(model, 1, builds), BuildMismatchError,
                 r"compiled for tensor_parallel_size 2, and this engine runs tensor_parallel_size 1")


def test_a_tampered_rank_artifact_is_refused_by_that_rank(compiled, tmp_path):
    import shutil

    model, builds, _ = compiled
    copy = tmp_path / "tampered"
    shutil.copytree(builds, copy)
    rank1 = next(b for b in ArtifactStore(copy).list() if b.manifest.key.model_config["tensor_parallel_rank"] == 1)
    artifact = rank1.path / "artifacts" / "pass_report.json"
    artifact.write_bytes(artifact.read_bytes().replace(b"paged", b"PAGED"))
    _start_fails(_config(model, 2, copy), BuildRefusedError,
                 rf"tensor-parallel rank 1: refusing build {rank1.digest[:12]}")


@pytest.mark.heavy
@pytest.mark.skipif(os.environ.get("COMPILED_SERVE_SLOW_TP") != "1",
                    reason="two Inductor TP=2 starts: 1.5-4 min on 2 cores; COMPILED_SERVE_SLOW_TP=1 runs it")
def test_inductor_per_rank_builds_record_and_load_every_rank_s_cache(compiled, tmp_path, monkeypatch):
    """compile_mode="inductor": each rank's build holds its own Inductor cache blob (the worker
    recorded its compiles in a cache dir of its own), and a TP=2 engine from those builds gives
    TP=1's tokens, the worker generating no graph at all (opt-in: 1.5-4 min on 2 cores)."""
    from compiled_serve.cache.inductor_artifacts import INDUCTOR_CACHE_ARTIFACT

    model, _, want = compiled
    builds = tmp_path / "inductor"
    flags = [f for f in FLAGS if f != "graph"]
    flags[flags.index("--compile-mode") + 1:flags.index("--compile-mode") + 1] = ["inductor"]
    assert compile_main(["compile", "--model", model, *flags, "--tensor-parallel-size", "2",
                         "--build-dir", str(builds)]) == 0
    stored = ArtifactStore(builds).list()
    assert len(stored) == 2
    for build in stored:
        names = {a.name for a in build.manifest.artifacts}
        assert INDUCTOR_CACHE_ARTIFACT in names, (build.manifest.key.model_config["tensor_parallel_rank"], names)
    config = dataclasses.replace(_config(model, 2, builds), compile_mode="inductor")
    # An empty Inductor cache (the worker inherits it): its hits can only come from its build.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "empty-inductor-cache"))
    engine = LLMEngine(config)
    try:
        message = engine.startup_report()["build"]
        assert message.count("loaded") == 2
        worker = message.split("rank 1: ", 1)[1]
        # The worker loaded its graphs from its build and generated none: its compile was skipped.
        assert worker.startswith("build") and ", 0 generated" in worker and " 0 graph(s)" not in worker, worker
        assert _tokens(engine) == want
    finally:
        engine.shutdown()
