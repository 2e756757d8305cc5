"""GPU timings of the Triton kernels, beside a measured device-to-device copy bandwidth.

Paged-attention decode is memory bound: its floor is (KV bytes read + q/out bytes) over memory
bandwidth, so the table prints achieved GB/s next to a large D2D copy (bytes read + written).
Llama-3-8B head config: 32 query heads, 8 kv heads, head_dim 128, bf16, 16-slot blocks. Each
timed call rotates among several block-table sets over one large cache, so repeated calls do
not read the same KV from L2. Also times a prefill (TFLOP/s), the KV write and the elementwise
ops. Writes JSON to $OUT/kernels_bench.json (when $OUT is set) or bench/results/.

    python bench/kernels_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _import_kernels() -> None:
    """Make `compiled_serve.kernels` importable from a bare checkout (no `pip install -e .`)."""
    try:
        import compiled_serve.kernels  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO))
        spec = importlib.util.spec_from_file_location(
            "compiled_serve.kernels",
            REPO / "kernels" / "__init__.py",
            submodule_search_locations=[str(REPO / "kernels")],
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["compiled_serve.kernels"] = module
        spec.loader.exec_module(module)


def _time_ms(fn: Callable[[], object]) -> float:
    """Median GPU time of one call, replayed from a CUDA graph (as the engine's decode steps are),
    so host launch overhead stays out; `_eager_ms` keeps it in."""
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return float(do_bench_cudagraph(fn, rep=100, return_mode="median"))


def _eager_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth_gbs() -> float:
    src = torch.randn(256 * 2**20, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms = _eager_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def bench_paged_attention(
    seqs: list[tuple[int, int]],  # (context incl. new tokens, new tokens) per sequence
    label: str,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 16,
) -> dict[str, float | int | str]:
    from compiled_serve.kernels.triton_paged_attention import paged_attention_triton

    dtype = torch.bfloat16
    num_seqs = len(seqs)
    blocks = [-(-ctx // block_size) for ctx, _ in seqs]
    max_blocks = max(blocks)
    kv_bytes_per_set = sum(2 * ctx * kv_heads * head_dim * 2 for ctx, _ in seqs)
    num_sets = max(1, min(8, (512 * 2**20) // kv_bytes_per_set))  # >= ~0.5 GB touched per rotation
    num_blocks = num_sets * sum(blocks)
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=dtype)
    perm = torch.randperm(num_blocks).to(torch.int32).split(blocks * num_sets)
    tables = []
    for r in range(num_sets):
        table = torch.zeros(num_seqs, max_blocks, dtype=torch.int32)
        for i in range(num_seqs):
            table[i, : blocks[i]] = perm[r * num_seqs + i]
        tables.append(table.cuda())
    q_lens = [q_len for _, q_len in seqs]
    num_tokens = sum(q_lens)
    q = torch.randn(num_tokens, heads, head_dim, device="cuda", dtype=dtype)
    out = torch.empty_like(q)
    seq_lens = torch.tensor([ctx for ctx, _ in seqs], device="cuda", dtype=torch.int32)
    qsl = torch.tensor([0, *itertools.accumulate(q_lens)], device="cuda", dtype=torch.int32)
    max_query_len, max_seq_len = max(q_lens), max(ctx for ctx, _ in seqs)
    state = {"i": 0}

    def run() -> None:
        state["i"] = (state["i"] + 1) % num_sets
        paged_attention_triton(
            q,
            kv_cache,
            tables[state["i"]],
            seq_lens,
            qsl,
            max_query_len,
            max_seq_len,
            head_dim**-0.5,
            out=out,
        )

    ms = _time_ms(run)
    eager_ms = _eager_ms(run)
    moved = kv_bytes_per_set + 2 * q.nbytes
    # Causal FLOPs: query j of a sequence sees ctx - q_len + j + 1 keys; QK^T and PV are 2*D each.
    keys = sum(ctx - q_len + j + 1 for ctx, q_len in seqs for j in range(q_len))
    flops = 4 * heads * head_dim * keys
    return {
        "kernel": "paged_attention",
        "shape": f"{label} {heads}q/{kv_heads}kv/{head_dim} bs{block_size} bf16",
        "ms": ms,
        "eager_ms": eager_ms,
        "gb_per_s": moved / ms / 1e6,
        "tflop_per_s": flops / ms / 1e9,
    }


def _row(
    kernel: str, shape: str, fn: Callable[[], object], moved_bytes: float
) -> dict[str, float | int | str]:
    ms = _time_ms(fn)
    return {
        "kernel": kernel,
        "shape": shape,
        "ms": ms,
        "eager_ms": _eager_ms(fn),
        "gb_per_s": moved_bytes / ms / 1e6,
    }


def bench_kv_write(num_tokens: int, kv_heads: int = 8, head_dim: int = 128) -> dict[str, float | int | str]:
    from compiled_serve.kernels.kv_write import write_kv_triton

    dtype = torch.bfloat16
    num_blocks = 4 * num_tokens // 16 + 1
    kv_cache = torch.zeros(2, num_blocks, 16, kv_heads, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(num_tokens, kv_heads, head_dim, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * 16, device="cuda")[:num_tokens]
    shape = f"{num_tokens} tok {kv_heads}kv/{head_dim}"
    return _row("write_kv", shape, lambda: write_kv_triton(k, v, kv_cache, slots), 4 * k.nbytes)


def bench_elementwise(
    num_tokens: int, hidden: int = 4096, inter: int = 14336
) -> list[dict[str, float | int | str]]:
    from compiled_serve.kernels.triton_activation import silu_and_mul_triton
    from compiled_serve.kernels.triton_norm import fused_add_rms_norm_triton, rms_norm_triton
    from compiled_serve.kernels.triton_rotary import rotary_embedding_triton

    dtype = torch.bfloat16
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=dtype)
    r = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    gu = torch.randn(num_tokens, 2 * inter, device="cuda", dtype=dtype)
    q = torch.randn(num_tokens, 32, 128, device="cuda", dtype=dtype)
    k = torch.randn(num_tokens, 8, 128, device="cuda", dtype=dtype)
    pos = torch.randint(0, 8192, (num_tokens,), device="cuda")
    cache = torch.randn(8192, 128, device="cuda", dtype=torch.float32)
    return [
        _row("rms_norm", f"{num_tokens}x{hidden}", lambda: rms_norm_triton(x, w, 1e-6), 2 * x.nbytes),
        _row(
            "fused_add_rms_norm",
            f"{num_tokens}x{hidden}",
            lambda: fused_add_rms_norm_triton(x, r, w, 1e-6),
            4 * x.nbytes,
        ),
        _row("silu_and_mul", f"{num_tokens}x2*{inter}", lambda: silu_and_mul_triton(gu), 1.5 * gu.nbytes),
        _row(
            "rotary_embedding",
            f"{num_tokens} tok 32q/8kv/128",
            lambda: rotary_embedding_triton(pos, q, k, cache),
            2 * (q.nbytes + k.nbytes) + num_tokens * 128 * 4,
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the headline decode shape")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels_bench.py needs a CUDA GPU")
    _import_kernels()
    import triton

    copy_gbs = copy_bandwidth_gbs()
    decode = [(64, 1024)] if args.quick else [(64, 1024), (1, 4096), (8, 2048), (32, 4096), (256, 512)]
    rows = [bench_paged_attention([(ctx, 1)] * n, f"decode {n}x ctx {ctx}") for n, ctx in decode]
    if not args.quick:
        rows.append(bench_paged_attention([(4096, 4096)], "prefill 1x 4096"))
        rows.append(bench_paged_attention([(2048, 512)] * 4, "chunks 4x (ctx 2048, q 512)"))
        mixed = [(1024, 1)] * 64 + [(2048, 512)]
        rows.append(bench_paged_attention(mixed, "mixed 64x (1024, 1) + (2048, 512)"))
        rows.append(bench_kv_write(16384))
        rows.extend(bench_elementwise(8192))

    props = torch.cuda.get_device_properties(0)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": {
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "host": platform.node(),
        },
        "software": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
        },
        "d2d_copy_gb_per_s": copy_gbs,
        "rows": rows,
    }
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels_bench.json").write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"{props.name}  torch {torch.__version__}  triton {triton.__version__}  D2D copy {copy_gbs:,.0f} GB/s"
    )
    print("ms: CUDA-graph replay (GPU time); eager ms adds host launch overhead")
    print(f"{'kernel':<20} {'shape':<52} {'ms':>9} {'eager ms':>9} {'GB/s':>8} {'% copy':>7} {'TFLOP/s':>8}")
    for row in rows:
        gbs = float(row["gb_per_s"])
        tflops = f"{float(row['tflop_per_s']):8.1f}" if "tflop_per_s" in row else f"{'':>8}"
        cells = f"{row['ms']:9.4f} {row['eager_ms']:9.4f} {gbs:8.0f} {100 * gbs / copy_gbs:6.1f}% {tflops}"
        print(f"{row['kernel']:<20} {row['shape']:<52} {cells}")
    print(f"wrote {out_dir / 'kernels_bench.json'}")


if __name__ == "__main__":
    main()
