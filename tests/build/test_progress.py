"""The start-up's progress display (compiled_serve.build.progress): on a terminal, a bar with its
count for each phase whose total is known (weights per tensor, warm-up per shape); off a terminal,
no display at all and one log line per phase, each printed once, with its elapsed time.

The terminal is a rich Console forced into terminal mode over a StringIO: what a person would see,
escape codes and all. The engine is real (a tiny random Llama saved as safetensors, so its weights
go through the per-tensor loader)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from tiny_engine import TINY_LLAMA

from compiled_serve.build.progress import CompileProgress
from compiled_serve.config import EngineConfig
from compiled_serve.engine.llm_engine import WARMUP_PHASE, WARMUP_SHAPES
from compiled_serve.phase_progress import report_progress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"


def _terminal() -> tuple[object, io.StringIO]:
    from rich.console import Console

    screen = io.StringIO()
    return Console(file=screen, force_terminal=True, width=120, color_system=None), screen


@pytest.fixture(scope="module")
def safetensors_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-safetensors")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "architectures"},
                                 architectures=TINY_LLAMA["architectures"])).save_pretrained(directory)
    assert list(directory.glob("*.safetensors")) and json.loads((directory / "config.json").read_text())
    return directory


def _config(model: Path) -> EngineConfig:
    return EngineConfig(model=str(model), dtype="float32", compile_mode="graph", num_kv_blocks=128,
                        max_num_seqs=4, build_cache=False)


def test_a_reported_total_draws_a_bar_with_its_count_on_a_terminal() -> None:
    console, screen = _terminal()
    with CompileProgress(console=console) as progress:
        progress.update("loading model")
        for done in range(1, 4):
            report_progress("loading weights", done, 10)
    text = ANSI.sub("", screen.getvalue())
    bar = [line for line in text.splitlines() if "loading weights" in line]
    assert bar and "3/10" in bar[-1] and "━" in bar[-1], text
    report_progress("loading weights", 4, 10)  # after the display closed: nobody listens, nothing breaks


def test_off_a_terminal_the_display_draws_nothing() -> None:
    console, screen = _terminal()
    with CompileProgress(enabled=False, console=console):
        report_progress("loading weights", 3, 10)
    assert screen.getvalue() == ""


def test_an_engine_start_on_a_terminal_shows_weights_and_warmup_bars(safetensors_model: Path) -> None:
    from compiled_serve.startup import start_engine

    console, screen = _terminal()
    engine = start_engine(_config(safetensors_model), spinner=True, console=console)
    text = ANSI.sub("", screen.getvalue())
    # Every parameter of the tiny Llama: embed, 2 x (2 norms, qkv as 3 shards, o, gate+up as 2, down),
    # final norm, lm_head.
    tensors = sum(2 if "gate_up" in n else 3 if "qkv" in n else 1 for n, _ in engine.model.named_parameters())
    weights = [line for line in text.splitlines() if "loading weights" in line and "/" in line]
    warmup = [line for line in text.splitlines() if WARMUP_PHASE in line]
    assert weights and f"{tensors}/{tensors}" in weights[-1] and "━" in weights[-1], text
    assert warmup and f"{WARMUP_SHAPES}/{WARMUP_SHAPES}" in warmup[-1], text


def test_an_engine_start_off_a_terminal_logs_each_phase_once(safetensors_model: Path) -> None:
    """stdout and stderr are pipes: no display, and the log has each phase's line once, timed."""
    code = ("import sys\nfrom compiled_serve.config import EngineConfig\n"
            "from compiled_serve.startup import start_engine\n"
            f"start_engine(EngineConfig(**{_config(safetensors_model).__dict__!r}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # the display would draw on stdout
    lines = result.stderr.splitlines()
    for phase, timed in (("loading weights:", False), ("loaded weights in", True),
                         ("compiling (warm-up steps)", False), ("warm-up done in", True),
                         ("engine ready in", True)):
        matching = [line for line in lines if phase in line]
        assert len(matching) == 1, (phase, result.stderr)
        assert re.match(TIMESTAMP, matching[0]), matching[0]
        assert not timed or re.search(r" in \d+\.\d+s", matching[0]), matching[0]
    # No record printed twice (by two handlers: the same timestamp and text). Passes' per-graph
    # lines ("fused-sampling: 1 match(es)") repeat in text for each graph, at their own times.
    assert not [line for line, n in Counter(lines).items() if n > 1], result.stderr
    assert "━" not in result.stderr and f"/{WARMUP_SHAPES}" not in result.stderr  # no bar, no tick lines
