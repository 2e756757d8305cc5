"""The table `compiled-serve bench` prints: one row per workload (per rate for W4), then the
measured ceilings, the GPU and the software under it."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from compiled_serve.bench.workloads import VLLM_GPU


def figure(value: float) -> str:
    """Thousands separators for large figures, three significant digits for small ones (CPU)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def vllm_ratio(summary: dict[str, Any]) -> str:
    peer = summary.get("vllm")
    if peer is None:
        return "-"
    return f"{peer['ratio']:.2f}x" + ("" if peer["same_gpu"] else f" (vLLM on {VLLM_GPU})")


def workload_label(record: dict[str, Any]) -> str:
    workload = record["workload"]
    return workload["id"] + (" (modified)" if workload["modified"] else "")


def offline_table(records: list[dict[str, Any]]) -> Table:
    table = Table(title="compiled-serve bench: offline")
    for name in ("workload", "engine", "tok/s", "floor tok/s", "% of floor", f"vs vLLM ({VLLM_GPU})", "startup s"):
        table.add_column(name, justify="left" if name in ("workload", "engine") else "right")
    for record in records:
        summary = record["headline"]
        table.add_row(workload_label(record), record["engine"], f"{summary['value']:,.1f} {summary['metric']}",
                      f"{summary['floor']:,.1f}", f"{summary['pct_of_floor']:.1f}%", vllm_ratio(summary),
                      f"{record['result']['startup_s']:.1f}")
    return table


def serve_table(record: dict[str, Any]) -> Table:
    table = Table(title=f"compiled-serve bench: {workload_label(record)} through the HTTP server (ms)")
    for name in ("rate req/s", "out tok/s", "TTFT p50", "TTFT p99", "prefill floor", "TPOT p50", "TPOT p99",
                 "step floor", "ITL p50", "ITL p99", "E2E p50", "E2E p99"):
        table.add_column(name, justify="right")
    for row in record["result"]["rates"]:
        table.add_row(f"{row['rate_req_s']:g}", f"{row['out_tok_s']:,.0f}",
                      *(f"{row[key]:,.2f}" for key in ("ttft_p50_ms", "ttft_p99_ms", "prefill_floor_ms",
                                                       "tpot_p50_ms", "tpot_p99_ms", "decode_step_floor_ms",
                                                       "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms")))
    return table


def environment_lines(record: dict[str, Any]) -> list[str]:
    ceilings, versions = record["ceilings"], record["versions"]
    software = ", ".join(f"{name} {value}" for name, value in versions.items() if value)
    return [f"{record['workload']['id']} on {record['hardware']}, {record['date']}: copy "
            f"{figure(ceilings['copy_gb_s'])} GB/s, matmul {figure(ceilings['matmul_tflop_s'])} TFLOP/s "
            f"({ceilings['method']})", f"  {software}", f"  {record['workload']['description']}",
            f"  JSON: {record.get('file', '-')}"]


def print_records(records: list[dict[str, Any]], console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)  # a log file: keep each row on one line
    offline = [r for r in records if r["headline"] is not None]
    if offline:
        console.print(offline_table(offline))
    for record in records:
        if record["headline"] is None:
            console.print(serve_table(record))
    for record in records:
        for line in environment_lines(record):
            console.print(line, highlight=False, markup=False)
