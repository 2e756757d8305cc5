"""Decode-size linear layers on the GPU: cuBLAS (torch's default and cuBLASLt) against the
weight-streaming Triton GEMM of bench/skinny_gemm_triton.py (an experiment), over a sweep of its tiles.

    python3 bench/gemm_bench.py [--model llama8b] [--m 1,64,128,256] [--out DIR]

Each timing replays a CUDA graph of calls that cycle over enough weight copies to overflow the
L2, as in the model, where every layer's weights arrive cold. Reports us per call and the
bandwidth reached (weight + activation bytes / time). Writes gemm_bench-<gpu>.json under --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from graph_timing import time_graph  # bench/, beside this script
from skinny_gemm_triton import reference_skinny_gemm, skinny_gemm  # bench/, beside this script

SHAPES = {  # name: (N, K)
    "llama8b": {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "qwen3_0.6b": {"qkv": (4096, 1024), "o_proj": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)},
}
TILES = [  # (block_n, block_k, num_warps, num_stages)
    (32, 128, 4, 4),
    (32, 256, 4, 3),
    (64, 128, 4, 4),
    (64, 128, 8, 4),
    (64, 256, 8, 3),
    (128, 64, 8, 5),
    (128, 128, 8, 3),
    (16, 256, 4, 4),
]


def _cublas_call(x, ws, out):
    return lambda i: torch.mm(x, ws[i % len(ws)].t(), out=out)


def _triton_call(x, ws, out, cfg):
    return lambda i: skinny_gemm(x, ws[i % len(ws)], out=out, **cfg)


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama8b")
    ap.add_argument("--m", default="1,16,64,128,256")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    dev = torch.device("cuda")
    ms = [int(v) for v in args.m.split(",")]
    rows = []
    t0 = time.time()
    for name, (n, k) in SHAPES[args.model].items():
        copies = max(2, -(-400_000_000 // (n * k * 2)))  # >= 400 MB of weights: L2 stays cold
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            nbytes = n * k * 2 + m * k * 2 + m * n * 2
            ref = reference_skinny_gemm(x, ws[0]).float()
            entry = {"shape": name, "n": n, "k": k, "m": m, "bytes": nbytes}
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                us = time_graph(_cublas_call(x, ws, out), calls=24)
                entry[lib] = {"us": round(us, 2), "gbps": round(nbytes / us / 1e3, 1)}
            torch.backends.cuda.preferred_blas_library("cublas")
            best = None
            for (bn, bk, warps, stages), split in itertools.product(TILES, (1, 2, 4, 8)):
                bm = _block_m(m)
                programs = -(-n // bn) * split * -(-m // bm)
                if k % (split * bk) or not (64 <= programs <= 4096):
                    continue
                cfg = dict(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=stages)
                try:
                    y = skinny_gemm(x, ws[0], **cfg)
                    err = (y.float() - ref).abs().max().item()
                    if err > 0.05 * max(1.0, ref.abs().max().item()):
                        print(f"  {name} m={m} {cfg}: wrong (max err {err:.3g})", flush=True)
                        continue
                    us = time_graph(_triton_call(x, ws, out, cfg), calls=24)
                except Exception as err:  # noqa: BLE001 (out of shared memory and the like)
                    print(f"  {name} m={m} {cfg}: {type(err).__name__}: {str(err)[:120]}", flush=True)
                    continue
                if best is None or us < best["us"]:
                    best = {"us": round(us, 2), "gbps": round(nbytes / us / 1e3, 1), **cfg}
            entry["triton_best"] = best
            rows.append(entry)
            print(
                f"{name:8s} m={m:4d}  cublas {entry['cublas']['us']:7.1f} us ({entry['cublas']['gbps']:6.0f} GB/s)"
                f"  lt {entry['cublaslt']['us']:7.1f} ({entry['cublaslt']['gbps']:6.0f})"
                f"  triton {best and best['us']} ({best and best['gbps']}) {best}",
                flush=True,
            )
        ws.clear()
        torch.cuda.empty_cache()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "-").lower()
    path = out_dir / f"gemm_bench-{args.model}-{gpu}.json"
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "seconds": round(time.time() - t0, 1)}  # fmt: skip
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path} in {meta['seconds']} s")


if __name__ == "__main__":
    main()
