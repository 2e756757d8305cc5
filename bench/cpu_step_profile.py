"""torch.profiler over decode steps of the embedded model on the CPU: where a step's time goes.

Runs `LLM(quantization=q)` (inductor, 2 threads), one warm-up generate, then profiles a
generate of `--batch` copies of the cpu_throughput prompt for `--new-tokens` greedy tokens and
writes the top ops by self CPU time (per step and per call) to bench/results/cpu_step_profile-<q>-b<batch>.json.

    python bench/cpu_step_profile.py [--quantization gguf] [--batch 16] [--new-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

PROMPT = "Write a short story about a robot who learns to paint. The robot lived in a"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", default="gguf")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from compiled_serve import LLM, SamplingParams

    llm = LLM(compile_mode="inductor", max_num_seqs=64, quantization=args.quantization)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    prompts = [PROMPT] * args.batch
    llm.generate(prompts, params, use_progress=False)
    start = time.perf_counter()
    llm.generate(prompts, params, use_progress=False)
    plain_s = time.perf_counter() - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        llm.generate(prompts, params, use_progress=False)
        prof_s = time.perf_counter() - start
    steps = args.new_tokens  # one prefill step + new_tokens - 1 decode steps
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.top]:
        rows.append({"op": e.key, "calls": e.count, "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
                     "total_ms_per_step": round(e.cpu_time_total / 1e3 / steps, 3),
                     "self_us_per_call": round(e.self_cpu_time_total / max(e.count, 1), 1)})
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": args.threads,
              "quantization": llm.llm_engine.quantization, "batch": args.batch, "new_tokens": args.new_tokens,
              "load": Path("/proc/loadavg").read_text().split()[0],
              "step_ms_unprofiled": round(plain_s / steps * 1e3, 2), "step_ms_profiled": round(prof_s / steps * 1e3, 2),
              "tok_s_unprofiled": round(args.batch * args.new_tokens / plain_s, 1), "top_self_cpu": rows}
    out = Path(args.out or Path(__file__).parent / "results" /
               f"cpu_step_profile-{args.quantization}-b{args.batch}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "top_self_cpu"}))
    for r in rows:
        print(f"{r['self_ms_per_step']:9.3f} ms/step {r['calls']:7d} calls {r['self_us_per_call']:9.1f} us/call  {r['op'][:90]}")


if __name__ == "__main__":
    main()
