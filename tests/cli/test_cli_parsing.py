"""`compiled-serve` argument parsing: --version, a positional model, help that explains each flag,
and a `--help` that imports neither torch nor FastAPI."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compiled_serve.cli import build_parser, main


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version_flag_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"compiled-serve {importlib.metadata.version('compiled-serve')}"


@pytest.mark.parametrize("command", ["serve", "compile", "chat"])
def test_model_is_positional_or_a_flag(command: str) -> None:
    parser = build_parser()
    extra = ["--build-dir", "out"] if command == "compile" else []
    assert parser.parse_args([command, "org/model", *extra]).model == "org/model"
    assert parser.parse_args([command, "--model", "org/model", *extra]).model == "org/model"
    assert parser.parse_args([command, "--model", "m", "m", *extra]).model == "m"  # the same twice is fine
    assert parser.parse_args([command, *extra]).model is None  # the embedded default
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--model", "a", "b", *extra])


def test_every_flag_says_what_it_does_its_choices_and_what_none_means() -> None:
    for name, sub in _subparsers().items():
        if name == "bench":
            continue  # bench's flags are its own module's
        required = {id(a) for group in sub._mutually_exclusive_groups if group.required for a in group._group_actions}
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = f"{name} {action.option_strings or action.metavar}"
            text = action.help or ""
            words = text.split("(default:")[0].strip()
            assert len(words) >= 12, f"{label}: help says only {text!r}"
            if action.default is None and action.option_strings and id(action) not in required:
                says_what_none_means = "none:" in text.lower() or ("(default: " in text and "None" not in text)
                assert says_what_none_means, f"{label}: default None, but the help does not say what that means"
        formatted = sub.format_help()
        assert "{auto,float32,bfloat16,float16}" in formatted and "{inductor,graph}" in formatted


def test_help_imports_neither_torch_nor_fastapi() -> None:
    probe = ("import sys\nfrom compiled_serve.cli import main\n"
             "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
             "heavy = sorted(m for m in ('torch', 'fastapi', 'uvicorn', 'transformers') if m in sys.modules)\n"
             "print('HEAVY', heavy)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    assert "--shutdown-timeout" in result.stdout


HELP_BOUND_S = 2.0  # the issue asks < 1 s; the bound leaves room for a loaded 2-core CI box


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"]])
def test_help_is_fast(argv: list[str]) -> None:
    """`compiled-serve --help` as a user runs it, timed from process start to exit.
    Measured on the idle 2-core machine: 0.22-0.24 s for both (the console script)."""
    script = Path(sys.executable).with_name("compiled-serve")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "compiled_serve.cli"]
    timings = []
    for _ in range(3):  # the fastest of three: one slow run on a busy box is noise, three are a regression
        start = time.perf_counter()
        result = subprocess.run([*command, *argv], capture_output=True, text=True, timeout=60)
        timings.append(time.perf_counter() - start)
        assert result.returncode == 0, result.stderr
        assert "usage: compiled-serve" in result.stdout
    assert min(timings) < HELP_BOUND_S, timings


def test_compile_and_serve_name_the_build_directory_with_one_flag(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(["serve", "--build-dir", "b"]).build_dir == "b"
    assert parser.parse_args(["compile", "--build-dir", "b"]).build_dir == "b"
    assert parser.parse_args(["compile", "--out", "old"]).build_dir == "old"  # the deprecated spelling works
    assert "--out is deprecated" in capsys.readouterr().err.replace("`compile --out` is", "--out is")
    assert "--out" not in parser._subparsers._group_actions[0].choices["compile"].format_help()


def test_build_cache_flags_reach_the_engine_config() -> None:
    from compiled_serve.cli import _engine_config

    on = _engine_config(build_parser().parse_args(["serve"]))
    off = _engine_config(build_parser().parse_args(["chat", "--no-build-cache", "--build-cache-gib", "0.5"]))
    assert (on.build_cache, on.build_cache_gib) == (True, 4.0)
    assert (off.build_cache, off.build_cache_gib) == (False, 0.5)


def test_serve_starts_its_engine_core_before_importing_torch() -> None:
    """The API process of `serve` (default engine) does not import torch before the core starts:
    the core imports it, and a second second of imports here would only delay the start."""
    probe = ("import sys\nfrom compiled_serve.cli import _is_embedding_model\n"
             "import compiled_serve.server.app, compiled_serve.server.engine_client\n"
             "assert not _is_embedding_model(None) and not _is_embedding_model('x.gguf')\n"
             "print('TORCH', 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "TORCH False" in result.stdout
