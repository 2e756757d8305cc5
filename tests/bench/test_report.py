"""`compiled-serve bench report`: the generated section of the docs page, the hand-written rest
kept, the plot (and its absence without matplotlib)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from compiled_serve.bench.report import BEGIN, END, write_record
from compiled_serve.cli import main

HAND_WRITTEN = "# Benchmarks\n\nIntro written by hand.\n\n## Server latency on the H100\n| a | b |\n|---|---|\n"


def serve_record(base: dict[str, Any]) -> dict[str, Any]:
    """A W4 record's shape, on the run's own environment (report rendering only)."""
    record = copy.deepcopy(base)
    record.update(headline=None, date=base["date"].replace("T", "T1"))
    record["workload"].update(id="W4", command="serve")
    row = {"rate_req_s": 2.0, "num_requests": 4, "wall_s": 3.0, "out_tok_s": 10.0, "mean_concurrency": 1.2,
           "first_request_ttft_ms": 40.0, "prefill_floor_ms": 0.5, "decode_step_floor_ms": 0.1,
           **{f"{m}_{q}_ms": 10.0 for m in ("ttft", "tpot", "itl", "e2e") for q in ("p50", "p99")}}
    record["result"] = {"startup_s": 5.0, "rates": [row, {**row, "rate_req_s": 8.0}]}
    return record


@pytest.fixture()
def results(tmp_path: Path, throughput_record: dict[str, Any], latency_record: dict[str, Any]) -> Path:
    directory = tmp_path / "results"
    for record in (throughput_record, latency_record, serve_record(throughput_record)):
        write_record(record, directory)
    # Another bench script's JSON in the same directory is not this tool's.
    (directory / "serve_latency-h100.json").write_text(json.dumps({"date": "2026-11-23", "rows": []}))
    return directory


def regenerate(results: Path, page: Path) -> str:
    assert main(["bench", "report", "--results-dir", str(results), "--docs", str(page)]) == 0
    return page.read_text()


def test_report_regenerates_the_section_and_keeps_the_rest(results: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    page = tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text(HAND_WRITTEN)
    text = regenerate(results, page)
    assert text.startswith("# Benchmarks\n\n" + BEGIN)
    assert text.count(BEGIN) == text.count(END) == 1
    assert text.split(END, 1)[1] == "\n\nIntro written by hand.\n\n## Server latency on the H100\n| a | b |\n|---|---|\n"
    section = text.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| 20")]
    assert len(rows) == 4  # W1, W3, and W4 at two rates; the other script's JSON is left out
    assert sum("W1 (modified)" in r and "out tok/s" in r for r in rows) == 1
    assert sum("W3 (modified)" in r and "decode tok/s" in r for r in rows) == 1
    assert sum("| W4 (modified) |" in r for r in rows) == 2
    assert "![bench results](benchmarks.png)" in section
    assert (page.parent / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Regenerating is stable, and edits outside the markers survive it.
    page.write_text(text + "\nA later note.\n")
    assert regenerate(results, page) == text + "\nA later note.\n"


def test_report_without_matplotlib(results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    page = tmp_path / "benchmarks.md"
    text = regenerate(results, page)  # no page yet: it is created
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "benchmarks.png").exists()
    assert "![bench results]" not in text and text.startswith("# Benchmarks\n\n" + BEGIN)
