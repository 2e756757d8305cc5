"""Every log line carries a timestamp and appears once: under the CLI's setup, under the offline
API's fallback (with and without an application's own logging), and while a progress display runs."""

from __future__ import annotations

import re
import subprocess
import sys

TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO compiled_serve\.")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def _lines_with(text: str, output: str) -> list[str]:
    return [line for line in output.splitlines() if text in line]


def test_cli_logging_timestamps_each_line_once_even_when_configured_twice() -> None:
    result = _run("import logging\nfrom compiled_serve.logging_setup import configure_logging\n"
                  "configure_logging('info'); configure_logging('info')\n"
                  "logging.getLogger('compiled_serve.engine').info('phase one')\n")
    lines = _lines_with("phase one", result.stderr)
    assert len(lines) == 1 and TIMESTAMPED.match(lines[0]), result.stderr


def test_library_logging_prints_once_alone_and_defers_to_the_applications_setup() -> None:
    result = _run("import logging\nfrom compiled_serve.logging_setup import ensure_library_logging\n"
                  "ensure_library_logging(); ensure_library_logging()\n"
                  "logging.getLogger('compiled_serve.models').info('alone')\n"
                  "logging.basicConfig(level='INFO', format='APP %(message)s')\n"
                  "logging.getLogger('compiled_serve.models').info('with the app')\n")
    alone = _lines_with("alone", result.stderr)
    assert len(alone) == 1 and TIMESTAMPED.match(alone[0]), result.stderr
    assert _lines_with("with the app", result.stderr) == ["APP with the app"]


def test_progress_display_records_lines_and_prints_each_once() -> None:
    """Before: the display printed `[ 0.00s] msg` itself and the logger printed `INFO ... msg`."""
    result = _run("import logging\nfrom compiled_serve.logging_setup import configure_logging\n"
                  "from compiled_serve.build.progress import CompileProgress\n"
                  "configure_logging('info')\n"
                  "with CompileProgress(enabled=True) as progress:\n"
                  "    progress.update('compiling (warm-up steps)')\n"
                  "    logging.getLogger('compiled_serve.passes').info('compiled graph 0 (graph) in 0.01s')\n"
                  "print('LINES', progress.lines)\n")
    everything = result.stdout + result.stderr
    for message in ("compiling (warm-up steps)", "compiled graph 0 (graph) in 0.01s"):
        printed = [line for line in _lines_with(message, everything) if not line.startswith("LINES")]
        assert len(printed) == 1 and TIMESTAMPED.match(printed[0]), everything
    recorded = _lines_with("LINES", result.stdout)[0]
    assert "s] compiling (warm-up steps)" in recorded and "s] compiled graph 0" in recorded


def test_log_level_warning_hides_progress_lines() -> None:
    """The progress display lowers the passes logger to INFO to see its lines; stderr still obeys --log-level."""
    result = _run("import logging\nfrom compiled_serve.logging_setup import configure_logging\n"
                  "from compiled_serve.build.progress import CompileProgress\n"
                  "configure_logging('warning')\n"
                  "with CompileProgress(enabled=False) as progress:\n"
                  "    logging.getLogger('compiled_serve.passes').info('compiled graph 0 (graph) in 0.01s')\n"
                  "    logging.getLogger('compiled_serve.passes').warning('a warning')\n"
                  "print('LINES', progress.lines)\n")
    assert "compiled graph 0" not in result.stderr and "a warning" in result.stderr
    assert "compiled graph 0" in result.stdout  # recorded for the build's log all the same
