"""Persisted builds: compile, load (warm start), refuse what cannot be trusted, reproduce, verify.

Fast tests use compile_mode="graph" (the pass pipeline runs, no Inductor), whose build holds the
pass report; the `heavy` tests run Inductor on the tiny model in fresh processes, as a server would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_engine import tiny_config_path, tiny_engine

from compiled_serve.build import BuildMismatchError, BuildRefusedError
from compiled_serve.build.compile import compile_build
from compiled_serve.cache import ArtifactStore
from compiled_serve.cli import _configs, build_parser, main
from compiled_serve.config import EngineConfig
from compiled_serve.errors import InvalidParameterError
from compiled_serve.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, **overrides) -> EngineConfig:
    fields = dict(model=tiny_config_path(tmp_path), load_format="dummy", dtype="float32", compile_mode="graph",
                  num_kv_blocks=64, max_num_seqs=8, device="cpu")
    fields.update(overrides)
    return EngineConfig(**fields)


def _cli_args(tmp_path: Path, mode: str = "graph") -> list[str]:
    return ["compile", "--model", tiny_config_path(tmp_path), "--load-format", "dummy", "--dtype", "float32",
            "--compile-mode", mode, "--num-kv-blocks", "64", "--max-num-seqs", "8", "--device", "cpu",
            "--no-progress"]


def test_compile_then_load(tmp_path: Path) -> None:
    result = compile_build(_config(tmp_path), tmp_path / "builds", show_progress=False)
    assert result.key.buckets == (2, 4, 8)
    assert [p[0] for p in result.key.passes] and all(len(p[1]) == 64 for p in result.key.passes)
    assert "pass_report.json" in result.artifacts
    assert any("compiled graph" in line for line in result.log)  # progress saw the passes
    engine = tiny_engine(tmp_path, num_kv_blocks=64, max_num_seqs=8, build_dir=str(tmp_path / "builds"))
    assert engine.build_status is not None and engine.build_status.loaded
    # The pass report and, on the CPU, the AOT-compiled step and tail variants with their index.
    n = len(result.artifacts)
    assert n == 2 + sum(name.startswith("precompiled-") for name in result.artifacts) and n >= 5
    assert engine.startup_report()["build"] == f"build {result.key.digest()[:12]} loaded: {n} artifacts"
    assert engine.precompiled is not None and engine.precompiled.complete  # a warm start traces nothing
    assert engine.compile_report.num_graphs == 0


def test_mismatched_build_is_refused_by_default(tmp_path: Path) -> None:
    """What CI wants: a build dir that holds no build for these settings stops the engine, and the
    error names what differs (stored vs requested) and both ways out."""
    compile_build(_config(tmp_path), tmp_path / "builds", show_progress=False)
    with pytest.raises(BuildMismatchError) as info:
        tiny_engine(tmp_path, num_kv_blocks=64, max_num_seqs=16, build_dir=str(tmp_path / "builds"))
    message = str(info.value)
    assert "buckets differs ((2, 4, 8) vs (2, 4, 8, 16))" in message
    assert "compiled-serve compile --build-dir" in message and "--build-fallback compile" in message
    with pytest.raises(BuildMismatchError, match="has no builds"):
        tiny_engine(tmp_path, num_kv_blocks=64, max_num_seqs=8, build_dir=str(tmp_path / "empty"))


def test_mismatched_build_compiles_with_fallback(tmp_path: Path) -> None:
    """What a cache wants: build_fallback="compile" starts cold and reports why."""
    compile_build(_config(tmp_path), tmp_path / "builds", show_progress=False)
    engine = tiny_engine(tmp_path, num_kv_blocks=64, max_num_seqs=16, build_dir=str(tmp_path / "builds"),
                         build_fallback="compile")
    assert not engine.build_status.loaded
    assert engine.startup_report()["build"] == "no matching build: buckets differs ((2, 4, 8) vs (2, 4, 8, 16))"
    engine.add_request("r", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert len(outputs[-1].outputs[0].token_ids) == 3  # the cold-compiled engine serves


def test_build_fallback_needs_a_build_dir() -> None:
    with pytest.raises(InvalidParameterError, match="build_fallback.*only applies with build_dir"):
        EngineConfig(build_fallback="compile")
    with pytest.raises(InvalidParameterError, match="build_fallback"):
        EngineConfig(build_dir="builds", build_fallback="maybe")


def test_serve_build_flags_reach_the_engine_config() -> None:
    args = build_parser().parse_args(["serve", "--build-dir", "b", "--build-fallback", "compile"])
    engine, _ = _configs(args)
    assert (engine.build_dir, engine.build_fallback) == ("b", "compile")
    engine, _ = _configs(build_parser().parse_args(["serve", "--build-dir", "b"]))
    assert engine.build_fallback == "refuse"


@pytest.mark.parametrize("damage", ["tamper", "truncate", "remove"])
def test_damaged_build_is_refused(tmp_path: Path, damage: str) -> None:
    result = compile_build(_config(tmp_path), tmp_path / "builds", show_progress=False)
    artifact = result.path / "artifacts" / "pass_report.json"
    if damage == "tamper":
        artifact.write_bytes(artifact.read_bytes().replace(b"paged", b"PAGED"))
    elif damage == "truncate":
        artifact.write_bytes(artifact.read_bytes()[:-1])
    else:
        artifact.unlink()
    with pytest.raises(BuildRefusedError, match="refusing build"):
        tiny_engine(tmp_path, num_kv_blocks=64, max_num_seqs=8, build_dir=str(tmp_path / "builds"))


def test_cli_compile_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "builds"
    assert main([*_cli_args(tmp_path), "--build-dir", str(out), "--explain"]) == 0
    printed = capsys.readouterr().out
    assert "saved to" in printed and "build key:" in printed and "matches" in printed
    # The logits tail's graphs are explained too: its chain became one fused_sample.
    assert "logits-tail graph 1: matches" in printed and "'fused-sampling': 1" in printed
    assert main([*_cli_args(tmp_path), "--verify", str(out)]) == 0
    assert "verified" in capsys.readouterr().out
    assert main([*_cli_args(tmp_path), "--verify", str(tmp_path / "empty")]) == 2  # nothing to verify
    # --out is the old name of --build-dir: the same build, kept.
    assert main([*_cli_args(tmp_path), "--out", str(out)]) == 0
    assert len(ArtifactStore(out).list()) == 1


def _compile_in_subprocess(tmp_path: Path, out: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "compiled_serve.cli", *_cli_args(tmp_path, mode), "--out", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.heavy
def test_concurrent_compiles_into_one_dir(tmp_path: Path) -> None:
    out = tmp_path / "builds"
    procs = [_compile_in_subprocess(tmp_path, out, "graph") for _ in range(2)]
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output
    builds = ArtifactStore(out).list()
    assert len(builds) == 1 and not ArtifactStore(out).verify(builds[0].path)


@pytest.mark.heavy
def test_inductor_build_is_reproducible_and_warm_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two compiles in fresh processes give the same artifacts (the AOT-compiled functions' bytes
    aside: compiled_serve.build.compile.verify_build); a fresh cache dir then runs the build's
    precompiled functions and traces and compiles nothing."""
    import torch
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    from compiled_serve.build.compile import PRECOMPILED_PREFIX

    manifests = []
    for name in ("a", "b"):
        p = _compile_in_subprocess(tmp_path, tmp_path / name, "inductor")
        output, _ = p.communicate(timeout=600)
        assert p.returncode == 0, output
        (build,) = ArtifactStore(tmp_path / name).list()
        manifests.append({a.name: a for a in build.manifest.artifacts if not a.name.startswith(PRECOMPILED_PREFIX)})
    assert manifests[0] == manifests[1]

    # config.patch, not monkeypatch: undoing a monkeypatch on a torch config module leaves the
    # option unreadable for later tests (their AOT compiles read it).
    with inductor_config.patch(force_disable_caches=False):
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "fresh-cache"))
        torch._dynamo.reset()
        counters.clear()
        engine = tiny_engine(tmp_path, num_kv_blocks=64, max_num_seqs=8, compile_mode="inductor",
                             build_dir=str(tmp_path / "a"))
        assert engine.build_status.loaded and engine.build_status.num_artifacts >= 5
        assert engine.precompiled is not None and engine.precompiled.complete
        assert engine.compile_report.num_graphs == engine.tail_report.num_graphs == 0
        assert counters["inductor"]["fxgraph_cache_miss"] == counters["inductor"]["fxgraph_cache_hit"] == 0
        report = json.loads((build.path / "artifacts" / "pass_report.json").read_bytes())
        assert len(report["graphs"]) == 1
    torch._dynamo.reset()


def test_cli_pass_flags_reach_the_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--disable-pass leaves a pass out of the build key and report; an unknown name is refused."""
    out = tmp_path / "builds"
    assert main([*_cli_args(tmp_path), "--out", str(out), "--disable-pass", "noop-elimination"]) == 0
    (build,) = ArtifactStore(out).list()
    names = [name for name, _ in build.manifest.key.passes]
    assert "noop-elimination" not in names and "paged-attention" in names
    report = json.loads((build.path / "artifacts" / "pass_report.json").read_bytes())
    assert all("noop-elimination" not in graph["matches"] for graph in report["graphs"])
    capsys.readouterr()
    assert main([*_cli_args(tmp_path), "--out", str(out), "--disable-pass", "no-such-pass"]) == 2
    assert "cannot disable unknown pass" in capsys.readouterr().err
