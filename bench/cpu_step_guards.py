"""Single-stream decode of the embedded model with and without dynamo's guard check on the CPU
step (model_runner.GuardsOffAfterWarmup), interleaved in one process so a drifting machine load
hits both alike; the same greedy tokens are required of both.

    python bench/cpu_step_guards.py [--quantization gguf] [--rounds 3] [--new-tokens 64]

Writes bench/results/cpu_step_guards-<quantization>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch

PROMPT = "Write a short story about a robot who learns to paint. The robot lived in a"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", default="gguf")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from compiled_serve import LLM, SamplingParams

    llm = LLM(compile_mode="inductor", max_num_seqs=64, quantization=args.quantization)
    step = llm.llm_engine.runner.step_fn
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    reference = llm.generate([PROMPT], params)[0].outputs[0].token_ids

    def run(armed: bool) -> float:
        step.armed = armed
        start = time.perf_counter()
        tokens = llm.generate([PROMPT], params)[0].outputs[0].token_ids
        elapsed = time.perf_counter() - start
        assert tokens == reference, "the two modes generated different tokens"
        return round(args.new_tokens / elapsed, 2)

    rows = {"guards_checked": [], "guards_skipped": []}
    for r in range(args.rounds):
        for armed in (False, True) if r % 2 == 0 else (True, False):
            rows["guards_skipped" if armed else "guards_checked"].append(run(armed))
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": args.threads,
              "quantization": llm.llm_engine.quantization, "new_tokens": args.new_tokens,
              "load_average": os.getloadavg(), "tok_s": rows, "same_tokens": True}
    out = Path(__file__).parent / "results" / f"cpu_step_guards-{args.quantization}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
