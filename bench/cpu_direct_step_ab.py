"""Same-process A/B of the CPU step: the direct call of the compiled graph (passes/direct_call.py)
against dynamo's armed path, alternating 128-token greedy generates of the embedded model.

    python bench/cpu_direct_step_ab.py [--pairs 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PROMPT = "Write a short story about a robot who learns to paint. The robot lived in a"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from compiled_serve import LLM, SamplingParams

    llm = LLM(compile_mode="inductor", max_num_seqs=64, quantization="gguf")
    step = llm.llm_engine.runner.step_fn
    direct = step.direct
    print("direct call armed:", direct is not None)
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    llm.generate([PROMPT], params, use_progress=False)
    tok_s: dict[str, list[float]] = {"direct": [], "dynamo": []}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.pairs):
        for name in ("direct", "dynamo"):
            step.direct = direct if name == "direct" else None
            start = time.perf_counter()
            out = llm.generate([PROMPT], params, use_progress=False)
            tok_s[name].append(128 / (time.perf_counter() - start))
            tokens.setdefault(name, list(out[0].outputs[0].token_ids))
    for name, values in tok_s.items():
        print(name, [round(v, 1) for v in values], "median", round(statistics.median(values), 1))
    print("same tokens:", tokens["direct"] == tokens["dynamo"])


if __name__ == "__main__":
    main()
