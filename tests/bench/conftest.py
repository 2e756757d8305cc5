"""Bench tests run a tiny random Llama (the engine tests' one) on the CPU, in-process."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

from tiny_engine import tiny_config_path  # noqa: E402

from compiled_serve.cli import main  # noqa: E402

# Small enough for seconds on two cores: a tiny model, 4 requests, lengths scaled to 2% of PERF.md's.
TINY_ENGINE_FLAGS = ["--dtype", "float32", "--compile-mode", "graph", "--num-kv-blocks", "128",
                     "--max-num-seqs", "32", "--device", "cpu"]


def run_bench(tmp: Path, command: str, *flags: str) -> dict[str, Any]:
    """Runs `compiled-serve bench COMMAND` in this process; returns the one JSON record it wrote."""
    results = tmp / "results"
    before = set(results.glob("*.json")) if results.exists() else set()
    assert main(["bench", command, "--model", tiny_config_path(tmp), "--results-dir", str(results),
                 *TINY_ENGINE_FLAGS, *flags]) == 0
    (path,) = set(results.glob("*.json")) - before
    return json.loads(path.read_text())


@pytest.fixture
def bench_runner():
    """`run_bench` for test modules (a `from conftest import` would find another directory's conftest)."""
    return run_bench


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="session")
def throughput_record(bench_dir: Path) -> dict[str, Any]:
    return run_bench(bench_dir, "throughput", "--workload", "W1", "--num-requests", "4", "--scale", "0.02")


@pytest.fixture(scope="session")
def latency_record(bench_dir: Path) -> dict[str, Any]:
    return run_bench(bench_dir, "latency", "--max-prompt-len", "16", "--max-output-len", "8", "--repeats", "2")
