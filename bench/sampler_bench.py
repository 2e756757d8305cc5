"""GPU timings of the fused sampler: the per-row kernel against the split-row path.

Shapes (rows, vocab): (1, 128256) batch 1 at Llama-3's vocabulary (W3), (128, 128256), and
(256, 151936) (W1, Qwen2's vocabulary). Row kinds: greedy, temperature only (1.0), top-k 50 with
top-p 0.9 (the split path hands these to the per-row kernel), and mixed (temperature rows, every
8th with top-p 0.9). `us` is triton.testing.do_bench's median (eager launches, host overhead
included), `graph us` the median of CUDA-graph replays (as the engine's decode steps run it);
`floor us` reads the logits once at the measured D2D copy bandwidth (at batch 1 the 0.5 MB row
stays in L2 between graph replays, so launches, not bandwidth, bound it there).

    python bench/sampler_bench.py [--dtype float32|bfloat16] [--programs 528,1056] [--out DIR]

--programs also times the split path at other targets of rows x chunks (TARGET_PROGRAMS).
Writes DIR/sampler_bench.json (DIR: --out, else $OUT, else bench/results).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from kernels_bench import REPO, _import_kernels, copy_bandwidth_gbs

SHAPES = [(1, 128256), (128, 128256), (256, 151936)]
KINDS = ["greedy", "temperature", "top-k/top-p", "mixed"]


def sampler_settings(kind: str, rows: int) -> tuple[torch.Tensor, ...]:
    """(temperature, top_k, top_p, min_p, seeds, offsets, greedy) on the GPU for one row kind."""
    full = lambda v, dtype=torch.float32: torch.full((rows,), v, dtype=dtype, device="cuda")  # noqa: E731
    top_k, top_p = full(0, torch.int32), full(1.0)
    if kind == "top-k/top-p":
        top_k, top_p = full(50, torch.int32), full(0.9)
    if kind == "mixed":
        top_p[::8] = 0.9
    seeds = torch.randint(0, 2**62, (rows,), device="cuda")
    offsets = torch.arange(rows, device="cuda")
    return full(1.0), top_k, top_p, full(0.0), seeds, offsets, full(kind == "greedy", torch.bool)


def _medians_us(fn: Callable[[], object]) -> tuple[float, float]:
    """(eager do_bench median, CUDA-graph replay median), in microseconds."""
    from triton.testing import do_bench, do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    eager = do_bench(fn, warmup=25, rep=100, return_mode="median")
    graph = do_bench_cudagraph(fn, rep=100, return_mode="median")
    return 1e3 * float(eager), 1e3 * float(graph)


def bench_shape(
    rows: int, vocab: int, dtype: torch.dtype, programs: list[int], copy_gbs: float
) -> list[dict]:
    import triton

    from compiled_serve.kernels.triton_sampler import fused_sample_triton
    from compiled_serve.kernels.triton_sampler_split import (
        TARGET_PROGRAMS,
        fused_sample_split_rows,
        split_chunks,
    )

    logits = (torch.randn(rows, vocab, device="cuda") * 3.0).to(dtype)
    token_ids = torch.empty(rows, dtype=torch.int64, device="cuda")
    logprobs = torch.empty(rows, dtype=torch.float32, device="cuda")
    block = min(1024, triton.next_power_of_2(vocab))  # fused_sample_triton's default
    floor_us = logits.nbytes / copy_gbs / 1e3
    results = []
    for kind in KINDS:
        settings = sampler_settings(kind, rows)
        variants: dict[str, Callable[[], object]] = {
            "per-row": lambda settings=settings: fused_sample_triton(logits, *settings, split_rows=False),
            "split": lambda settings=settings: fused_sample_triton(logits, *settings),
        }
        for target in programs:
            if target != TARGET_PROGRAMS:
                split_at = functools.partial(fused_sample_split_rows, block=block, target_programs=target)
                variants[f"split@{target}"] = functools.partial(
                    split_at, token_ids, logprobs, logits, *settings
                )
        reference = fused_sample_triton(logits, *settings, split_rows=False)[0]
        same = bool(torch.equal(fused_sample_triton(logits, *settings)[0], reference))
        for name, fn in variants.items():
            eager_us, graph_us = _medians_us(fn)
            target = int(name.split("@")[1]) if "@" in name else TARGET_PROGRAMS
            chunks = split_chunks(rows, vocab, block, target)[0] if name != "per-row" else 1
            results.append({
                "rows": rows, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."), "kind": kind,
                "kernel": name, "chunks": chunks, "us": eager_us, "graph_us": graph_us, "floor_us": floor_us,
                "tokens_equal_per_row": same,
            })  # fmt: skip
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--programs", default="", help="comma-separated extra split targets (rows x chunks)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sampler_bench.py needs a CUDA GPU")
    _import_kernels()
    import triton

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    programs = [int(p) for p in args.programs.split(",") if p]
    copy_gbs = copy_bandwidth_gbs()
    rows = [r for rows, vocab in SHAPES for r in bench_shape(rows, vocab, dtype, programs, copy_gbs)]

    props = torch.cuda.get_device_properties(0)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": {"gpu": props.name, "sms": props.multi_processor_count, "host": platform.node()},
        "software": {"torch": torch.__version__, "triton": triton.__version__},
        "d2d_copy_gb_per_s": copy_gbs,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampler_bench.json").write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"{props.name}  torch {torch.__version__}  triton {triton.__version__}  D2D copy {copy_gbs:,.0f} GB/s"
    )
    print(f"{'rows x vocab':<14} {'kind':<12} {'kernel':<11} {'chunks':>6} {'us':>9} {'graph us':>9} "
          f"{'floor us':>9} {'same ids':>8}")  # fmt: skip
    for r in rows:
        times = f"{r['us']:9.1f} {r['graph_us']:9.1f} {r['floor_us']:9.1f}"
        print(f"{r['rows']:>4} x {r['vocab']:<7} {r['kind']:<12} {r['kernel']:<11} {r['chunks']:>6} "
              f"{times} {str(r['tokens_equal_per_row']):>8}")  # fmt: skip
    print(f"wrote {out / 'sampler_bench.json'}")


if __name__ == "__main__":
    main()
