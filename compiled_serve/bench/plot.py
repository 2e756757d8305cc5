"""The PNG of docs/benchmarks.md: each offline workload's latest run as % of its floor (beside
vLLM's recorded figure on the same floor, where the run was on vLLM's GPU), and W4's TTFT and
TPOT p50 against the arrival rate. Needs matplotlib (`pip install 'compiled-serve[bench]'`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compiled_serve.bench.table import workload_label


def latest_by_label(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(workload label, hardware) -> its newest record (records come oldest first)."""
    return {(workload_label(r), r["hardware"]): r for r in records}


def write_plot(records: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("compiled-serve bench report: matplotlib is not installed; no plot written "
              "(pip install 'compiled-serve[bench]')")
        return False
    if not records:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = latest_by_label(records)
    offline = [r for r in latest.values() if r["headline"] is not None]
    serve = [r for r in latest.values() if r["headline"] is None]
    panels = [p for p in (offline, serve) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    axes = list(axes[0])
    if offline:
        _floor_bars(axes.pop(0), offline)
    if serve:
        _latency_lines(axes.pop(0), serve)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return True


def _floor_bars(ax: Any, records: list[dict[str, Any]]) -> None:
    labels = [f"{workload_label(r)}\n{r['hardware']}" for r in records]
    ours = [r["headline"]["pct_of_floor"] for r in records]
    peers = [100.0 * r["headline"]["vllm"]["value"] / r["headline"]["floor"]
             if r["headline"]["vllm"] and r["headline"]["vllm"]["same_gpu"] else 0.0 for r in records]
    xs = range(len(records))
    ax.bar([x - 0.2 for x in xs], ours, width=0.4, label="compiled_serve")
    ax.bar([x + 0.2 for x in xs], peers, width=0.4, label="vLLM 0.21.0 (recorded, same GPU only)")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("% of the physical floor")
    ax.set_ylim(0, 100)
    ax.set_title("Offline: W1, W2 out tok/s; W3 decode tok/s")
    ax.legend(fontsize=8)


def _latency_lines(ax: Any, records: list[dict[str, Any]]) -> None:
    for r in records:
        rows = r["result"]["rates"]
        rates = [row["rate_req_s"] for row in rows]
        name = f"{workload_label(r)}, {r['hardware']}"
        ax.plot(rates, [row["ttft_p50_ms"] for row in rows], marker="o", label=f"TTFT p50, {name}")
        ax.plot(rates, [row["tpot_p50_ms"] for row in rows], marker="s", label=f"TPOT p50, {name}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel("ms")
    ax.set_title("W4 through the HTTP server")
    ax.legend(fontsize=7)
