"""The per-token FP8 quantize of an activation on CUDA, as Inductor fuses it into its producer:
one-program-per-row amax (`t.abs().amax(-1)`) against the chunked `row_amax` the engine uses.

Two producers from a Llama-3.1-8B decode step: SiLU-mul of the gate/up output (the down
projection's input, 14,336 wide) and the residual add + RMSNorm (the qkv / gate_up input, 4,096
wide), each followed by the quantize, compiled by Inductor (dynamic row count) and timed as CUDA
graph replays (the engine's decode steps are graphs), at 1 row (W3) and 128 rows (W2).
Writes bench/results/fp8/fp8_quantize_bench-<gpu>.json.

    python bench/fp8_quantize_bench.py [--rows 1,128] [--iters 2000]
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from compiled_serve.kernels.quantized_linear import FP8_DTYPE, FP8_MAX, row_amax


def _quantize(t: torch.Tensor, chunked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    amax = (row_amax(t) if chunked else t.abs().amax(dim=-1, keepdim=True)).float()
    scales = (amax / FP8_MAX).clamp(min=1e-12)
    return (t.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales


def silu_mul_quantize(gate_up: torch.Tensor, chunked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = gate_up.chunk(2, dim=-1)
    return _quantize(F.silu(gate) * up, chunked)


def add_norm_quantize(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor,
                      chunked: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = x + residual
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(h.dtype) * w
    q, s = _quantize(normed, chunked)
    return q, s, h


def _time_graph(fn, args, iters: int) -> float:
    """Microseconds per call of fn(*args) replayed from a CUDA graph of `iters` back-to-back calls."""
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn(*args)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,128")
    ap.add_argument("--iters", type=int, default=2000)
    args = ap.parse_args()
    dev = torch.device("cuda")
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        gate_up = torch.randn(rows, 2 * 14336, device=dev, dtype=torch.bfloat16)
        x = torch.randn(rows, 4096, device=dev, dtype=torch.bfloat16)
        res = torch.randn_like(x)
        w = torch.randn(4096, device=dev, dtype=torch.bfloat16)
        for name, fn, fargs in (("silu_mul_quantize 14336", silu_mul_quantize, (gate_up,)),
                                ("add_rmsnorm_quantize 4096", add_norm_quantize, (x, res, w))):
            row = {"producer": name, "rows": rows}
            outs = {}
            for chunked in (False, True):
                compiled = torch.compile(lambda *a, _f=fn, _c=chunked: _f(*a, _c), dynamic=True)
                outs[chunked] = compiled(*fargs)
                row["chunked_us" if chunked else "one_program_us"] = round(_time_graph(compiled, fargs, args.iters), 2)
            row["bit_identical"] = all(torch.equal(a.view(torch.uint8) if a.dtype == FP8_DTYPE else a,
                                                   b.view(torch.uint8) if b.dtype == FP8_DTYPE else b)
                                       for a, b in zip(outs[False], outs[True]))
            print(row, flush=True)
            results.append(row)
    gpu = torch.cuda.get_device_name()
    out = Path(__file__).parent / "results" / "fp8" / f"fp8_quantize_bench-{gpu.replace(' ', '-').lower()}.json"
    out.write_text(json.dumps({"gpu": gpu, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                               "iters_per_graph": args.iters, "results": results}, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
