"""Decode paged-attention tiles and split counts on the GPU, at the PERF.md workloads' shapes.

    python3 bench/attention_sweep.py [--out DIR]

For each shape (W3: one Llama-8B sequence at ~1,150 keys; W2: 128 sequences at the W2 lengths
midway through decode; W1: 256 Qwen3-0.6B sequences) it times every decode tile of TILES with
every split count of SPLITS (CUDA-graph replays rotating over block-table sets, so the KV comes
from memory, as in a step) and prints the best against today's choice (triton_attention_config).
Writes attention_sweep-<gpu>.json under --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import torch
from graph_timing import time_graph  # bench/, beside this script

from compiled_serve.kernels import triton_attention_config as config
from compiled_serve.kernels import triton_paged_attention as tpa

TILES = [  # (tile_n, num_warps, num_stages)
    (32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3),
]  # fmt: skip
SPLITS = (1, 2, 4, 8, 16, 32, 64)


def _shapes() -> dict[str, dict]:
    rng = random.Random(0)
    w2 = [rng.randint(100, 1024) + rng.randint(100, 1024) // 2 for _ in range(128)]
    w1 = [rng.randint(100, 1024) + rng.randint(100, 1024) // 2 for _ in range(256)]
    return {
        "W3 1x1150 (8B)": dict(ctx=[1150], heads=32, kv_heads=8),
        "W3 2x1150 bucket (8B)": dict(ctx=[1150, 0], heads=32, kv_heads=8),
        "W2 128 seqs mid-decode (8B)": dict(ctx=w2, heads=32, kv_heads=8),
        "W2 32 seqs late (8B)": dict(ctx=w2[:32], heads=32, kv_heads=8),
        "W1 256 seqs mid-decode (0.6B)": dict(ctx=w1, heads=16, kv_heads=8),
    }


def _setup(ctx: list[int], heads: int, kv_heads: int, head_dim: int = 128, block_size: int = 16):
    dev, dtype = torch.device("cuda"), torch.bfloat16
    num_seqs = len(ctx)
    blocks = [max(1, -(-c // block_size)) for c in ctx]
    kv_bytes = sum(2 * c * kv_heads * head_dim * 2 for c in ctx)
    sets = max(1, min(8, (512 * 2**20) // max(1, kv_bytes)))
    num_blocks = sets * sum(blocks)
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device=dev, dtype=dtype)
    perm = torch.randperm(num_blocks).to(torch.int32).split(blocks * sets)
    width = -(-max(blocks) // 16) * 16
    tables = []
    for r in range(sets):
        table = torch.zeros(num_seqs, width, dtype=torch.int32)
        for i in range(num_seqs):
            table[i, : blocks[i]] = perm[r * num_seqs + i]
        tables.append(table.to(dev))
    real = [1 if c > 0 else 0 for c in ctx]
    q = torch.randn(num_seqs, heads, head_dim, device=dev, dtype=dtype)
    seq_lens = torch.tensor(ctx, device=dev, dtype=torch.int32)
    qsl = torch.tensor([0, *itertools.accumulate(real)], device=dev, dtype=torch.int32)
    return q, kv_cache, tables, seq_lens, qsl, kv_bytes


def _runner(q, kv_cache, tables, seq_lens, qsl, out, splits):
    """One attention call per invocation, each on the next block-table set (the first on set 0)."""
    state = {"i": -1}

    def run(_call: int = 0) -> None:
        state["i"] = (state["i"] + 1) % len(tables)
        tpa.paged_attention_triton(q, kv_cache, tables[state["i"]], seq_lens, qsl, 1, 131072, 128**-0.5,
                                   out=out, num_splits=splits)  # fmt: skip

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    t0 = time.time()
    sms = config.multiprocessors(torch.device("cuda"))
    original = tpa.decode_tiles
    rows = []
    for label, shape in _shapes().items():
        q, kv_cache, tables, seq_lens, qsl, kv_bytes = _setup(**shape)
        out = torch.empty_like(q)
        group = shape["heads"] // shape["kv_heads"]
        today_tiles = original(group, 128, q.dtype)
        today_splits = config.choose_num_splits(len(shape["ctx"]) * shape["kv_heads"], 131072, sms)
        ref = None
        results = []
        for (tile_n, warps, stages), splits in itertools.product(TILES, SPLITS):
            tiles = config.AttentionTiles(today_tiles.block_m, today_tiles.block_q, tile_n, warps, stages)
            tpa.decode_tiles = lambda *a, tiles=tiles: tiles
            run = _runner(q, kv_cache, tables, seq_lens, qsl, out, splits)
            try:
                run()
                if ref is None:
                    ref = out.clone()
                elif (out.float() - ref.float()).abs().max().item() > 2e-2:
                    print(f"  {label} {tiles} splits {splits}: WRONG", flush=True)
                    continue
                us = time_graph(run)
            except Exception as err:  # noqa: BLE001 (out of resources and the like)
                print(f"  {label} {tiles} splits {splits}: {type(err).__name__} {str(err)[:100]}", flush=True)
                continue
            finally:
                tpa.decode_tiles = original
            results.append({"tile_n": tile_n, "num_warps": warps, "num_stages": stages, "splits": splits,
                            "us": round(us, 2), "gbps": round(kv_bytes / us / 1e3, 1)})  # fmt: skip
        best = min(results, key=lambda r: r["us"])
        today = next((r for r in results if (r["tile_n"], r["num_warps"], r["num_stages"], r["splits"])
                      == (today_tiles.tile_n, today_tiles.num_warps, today_tiles.num_stages, today_splits)), None)  # fmt: skip
        rows.append({"shape": label, "kv_bytes": kv_bytes, "today": today, "best": best, "all": results})
        print(f"{label:32s} today {today}  best {best}", flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "-").lower()
    path = out_dir / f"attention_sweep-{gpu}.json"
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "sms": sms, "seconds": round(time.time() - t0, 1)}  # fmt: skip
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path} in {meta['seconds']} s")


if __name__ == "__main__":
    main()
