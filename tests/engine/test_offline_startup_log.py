"""The offline `LLM()` is not silent: run as a user's script (a subprocess, stderr a pipe), its
start-up logs the same phases as `serve`, each line exactly once, timestamped, with its elapsed
time, on a cold start (compile, store the build) and on the warm start after it (load the build).

The embedded default model (SmolLM2-135M GGUF, dequantized to fp32), with small settings: a cold
start took 42 s and the warm one 8 s on the idle 2-core machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO compiled_serve\.")
ELAPSED = re.compile(r" in \d+\.\d+s")
# quantization='none': the quantized GGUF load (the default, auto, on the CPU) logs neither
# "loading weights:" nor "loaded weights in" (models/quantization.py goes around models/loader.py,
# which writes them), and its warm start traces its step again; this test holds the fp32 start.
SCRIPT = ("from compiled_serve import LLM, SamplingParams\n"
          "llm = LLM(compile_mode='graph', max_num_seqs=4, cpu_kv_cache_gib=0.25, quantization='none')\n"
          "out = llm.generate(['Hello'], SamplingParams(max_tokens=4, temperature=0), use_progress=False)\n"
          "print('TEXT', repr(out[0].outputs[0].text))\n")

# (what the line says, whether it carries an elapsed time)
COLD = [("loading weights:", False), ("loaded weights in", True), ("build cache: no build", False),
        ("compiling (warm-up steps)", False), ("passes on graph 0:", True), ("compiled graph 0 (graph) in", True),
        ("warm-up done in", True), ("stored in the build cache in", True), ("engine ready in", True)]
WARM = [("loading weights:", False), ("loaded weights in", True), ("loaded from the build cache", False),
        ("compiling (warm-up steps)", False), ("warm-up done in", True), ("engine ready in", True)]


def _start(cache_root: Path) -> list[str]:
    env = {**os.environ, "COMPILED_SERVE_CACHE_ROOT": str(cache_root)}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^TEXT '.+'$", result.stdout, re.M), result.stdout  # it generated, on stdout only
    return result.stderr.splitlines()


def _assert_phases(lines: list[str], phases: list[tuple[str, bool]]) -> None:
    log = "\n".join(lines)
    at = []
    for phase, timed in phases:
        matching = [i for i, line in enumerate(lines) if phase in line]
        assert len(matching) == 1, (phase, log)
        line = lines[matching[0]]
        assert TIMESTAMP.match(line), line
        assert not timed or ELAPSED.search(line), line
        at.append(matching[0])
    assert at == sorted(at), log  # in the order they happen
    assert not [line for line, n in Counter(lines).items() if n > 1], log  # no record printed twice
    assert "━" not in log  # off a terminal: no progress bar


@pytest.mark.heavy
def test_offline_llm_logs_each_phase_once_cold_then_warm(tmp_path: Path) -> None:
    _assert_phases(_start(tmp_path), COLD)
    _assert_phases(_start(tmp_path), WARM)
