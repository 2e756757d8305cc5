"""The embedded model's logits head on the CPU: which kernel per row count (issue 13).

    python bench/cpu_head_bench.py [--rows 1,2,4,8,16,64] [--threads 2]

The head is the tied 49,152 x 576 embedding. Candidates, each over `--copies` copies of the table
cycled call by call so that every call reads its weights from memory, as in a decode step:
  bf16         F.linear on the bf16 table (what the quantized engine runs today)
  bf16_packed  oneDNN's linear on a table reordered once into its blocked layout
               (`mkldnn._reorder_linear_weight`, `mkldnn._linear_pointwise`)
  int8         `torch._weight_int8pack_mm` on a per-row int8 copy (half the bytes)
Reports the 25th-percentile ms per call and writes bench/results/cpu_head_bench.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch


def _time(fn, copies: int, calls: int) -> float:
    times = []
    for i in range(calls):
        start = time.perf_counter()
        fn(i % copies)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 4] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--calls", type=int, default=24)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_head_bench.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab, hidden = 49152, 576
    gen = torch.Generator().manual_seed(0)
    tables = [(torch.randn(vocab, hidden, generator=gen) * 0.05).to(torch.bfloat16) for _ in range(args.copies)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(t, 16) for t in tables]
    scales = [(t.float().abs().amax(dim=1) / 127).clamp(min=1e-12) for t in tables]
    codes = [torch.round(t.float() / s[:, None]).clamp(-127, 127).to(torch.int8) for t, s in zip(tables, scales)]
    scales = [s.to(torch.bfloat16) for s in scales]
    rows = []
    for m in (int(v) for v in args.rows.split(",")):
        x = torch.randn(m, hidden, generator=gen).to(torch.bfloat16)
        ref = torch.nn.functional.linear(x, tables[0]).float()
        got = torch.ops.mkldnn._linear_pointwise(x, packed[0], None, "none", [], "").float()
        assert torch.allclose(got, ref, rtol=1e-2, atol=1e-2), "the packed linear disagrees"
        fns = {
            "bf16": lambda i, x=x: torch.nn.functional.linear(x, tables[i]),
            "bf16_packed": lambda i, x=x: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], ""),
            "int8": lambda i, x=x: torch._weight_int8pack_mm(x, codes[i], scales[i]),
        }
        row = {"rows": m, "load": round(os.getloadavg()[0], 2)}
        for _ in range(2):  # the second pass is the one kept: each alternates with the others
            for name, fn in fns.items():
                row[name] = round(_time(fn, args.copies, args.calls), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": args.threads,
              "shape": [vocab, hidden], "copies": args.copies, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
