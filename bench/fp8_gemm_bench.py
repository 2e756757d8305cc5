"""FP8 decode linears on the GPU, against bf16 cuBLAS: why the engine's FP8 step is slower.

    python3 bench/fp8_gemm_bench.py [--model llama8b] [--m 1,16,64,128,256] [--out DIR]

Per Llama-3.1-8B linear shape and row count M (L2-cold CUDA-graph replays, as in gemm_bench.py):
  bf16          torch.mm on bf16 weights (what the bf16 engine runs)
  op            the engine's fp8 op today: quantize x per row (amax, divide, cast), then
                `torch._scaled_mm` with rowwise scales
  rowwise       `_scaled_mm` alone, x already e4m3, rowwise scales
  tensorwise    `_scaled_mm` alone with one scale per tensor (cuBLASLt's FP8 path)
  tensorwise_op quantize x per tensor, `_scaled_mm` tensorwise, then the per-channel weight scale
  triton        bench/fp8_weight_gemm_triton.py (e4m3 weights converted to bf16 in registers,
                x stays bf16; best of a tile sweep)
Writes fp8_gemm_bench-<model>-<gpu>.json under --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from fp8_weight_gemm_triton import fp8_weight_linear_triton, reference_fp8_weight_linear
from gemm_bench import SHAPES
from graph_timing import time_graph

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
TILES = [  # (block_n, block_k, num_warps, num_stages)
    (16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3),
    (64, 256, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3),
]


def _quant_rows(x):
    s = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def _quant_tensor(x):
    s = (x.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def _row(name, n, k, m, wb, wq, ws, wqt, wts, copies, one):
    dev = wb[0].device
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    xq, xs = _quant_rows(x)
    xqt, xst = _quant_tensor(x)
    out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
    ref = reference_fp8_weight_linear(x, wq[0], ws[0][:, 0]).float()
    entry = {"shape": name, "n": n, "k": k, "m": m, "bf16_bytes": n * k * 2, "fp8_bytes": n * k}

    def put(label, fn, nbytes):
        us = time_graph(fn, calls=24)
        entry[label] = {"us": round(us, 2), "gbps": round(nbytes / us / 1e3, 1)}

    put("bf16", lambda i: torch.mm(x, wb[i % copies].t(), out=out), n * k * 2)

    def op(i):
        a, sa = _quant_rows(x)
        return torch._scaled_mm(a, wq[i % copies].t(), scale_a=sa, scale_b=ws[i % copies].t(),
                                out_dtype=torch.bfloat16)

    put("op", op, n * k)
    put("rowwise", lambda i: torch._scaled_mm(xq, wq[i % copies].t(), scale_a=xs, scale_b=ws[i % copies].t(),
                                              out_dtype=torch.bfloat16), n * k)
    put("tensorwise", lambda i: torch._scaled_mm(xqt, wqt[i % copies].t(), scale_a=xst, scale_b=one,
                                                 out_dtype=torch.bfloat16), n * k)

    def tensorwise_op(i):
        a, sa = _quant_tensor(x)
        y = torch._scaled_mm(a, wqt[i % copies].t(), scale_a=sa, scale_b=wts[i % copies],
                             out_dtype=torch.bfloat16)
        return y

    put("tensorwise_op", tensorwise_op, n * k)
    best = None
    for (bn, bk, warps, stages), split in itertools.product(TILES, (1, 2, 4, 8)):
        bm = 1 if m == 1 else 16 if m <= 16 else 32 if m <= 32 else 64
        programs = -(-n // bn) * split * -(-m // bm)
        if k % (split * bk) or not (64 <= programs <= 8192):
            continue
        cfg = dict(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=stages)
        try:
            y = fp8_weight_linear_triton(x, wq[0], ws[0][:, 0], **cfg)
            err = (y.float() - ref).abs().max().item()
            if err > 0.02 * max(1.0, ref.abs().max().item()):
                print(f"  {name} m={m} {cfg}: wrong (max err {err:.3g})", flush=True)
                continue
            us = time_graph(lambda i, cfg=cfg: fp8_weight_linear_triton(
                x, wq[i % copies], ws[i % copies][:, 0], out=out, **cfg), calls=24)
        except Exception as err:  # noqa: BLE001 (out of shared memory and the like)
            print(f"  {name} m={m} {cfg}: {type(err).__name__}: {str(err)[:120]}", flush=True)
            continue
        if best is None or us < best["us"]:
            best = {"us": round(us, 2), "gbps": round(n * k / us / 1e3, 1), **cfg}
    entry["triton"] = best
    print(f"{name:8s} m={m:4d}  " + "  ".join(
        f"{lab} {entry[lab]['us']:.1f}" for lab in ("bf16", "op", "rowwise", "tensorwise", "tensorwise_op"))
        + f"  triton {best and best['us']} {best}", flush=True)
    return entry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama8b")
    ap.add_argument("--m", default="1,16,64,128,256")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    dev = torch.device("cuda")
    ms = [int(v) for v in args.m.split(",")]
    rows, t0 = [], time.time()
    one = torch.ones((), device=dev)
    for name, (n, k) in SHAPES[args.model].items():
        copies = max(2, -(-400_000_000 // (n * k)))  # >= 400 MB of fp8 weights: L2 stays cold
        wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        wq, ws = zip(*(_quant_rows(w) for w in wb))
        wts = [w.float().abs().amax() / FP8_MAX for w in wb]
        wqt = [(w.float() / s).to(FP8) for w, s in zip(wb, wts)]
        for m in ms:
            rows.append(_row(name, n, k, m, wb, wq, ws, wqt, wts, copies, one))
        del wb, wq, ws, wqt, wts
        torch.cuda.empty_cache()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "-").lower()
    path = out_dir / f"fp8_gemm_bench-{args.model}-{gpu}.json"
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "seconds": round(time.time() - t0, 1)}  # fmt: skip
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path} in {meta['seconds']} s")


if __name__ == "__main__":
    main()
