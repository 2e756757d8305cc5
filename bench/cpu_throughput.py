"""CPU output tok/s of the embedded SmolLM2-135M, single stream and batched, beside transformers.

Workload (../shared/PERF.md, CPU section): a 19-token prompt, 128 greedy tokens, EOS ignored;
single stream and a batch of 16. Both engines run the same dequantized GGUF weights in fp32.
Writes bench/results/cpu_throughput.json and prints one table.

    python bench/cpu_throughput.py [--compile-mode inductor|graph] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

PROMPT = "Write a short story about a robot who learns to paint. The robot lived in a"
NEW_TOKENS = 128


def bench_ours(mode: str, batch: int) -> tuple[float, list[int]]:
    from compiled_serve import LLM, SamplingParams

    llm = LLM(compile_mode=mode, max_num_seqs=64)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm.generate([PROMPT], params, use_progress=False)  # warm the compiled shapes
    start = time.perf_counter()
    outs = llm.generate([PROMPT] * batch, params, use_progress=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / seconds, outs[0].outputs[0].token_ids


def bench_transformers(batch: int) -> tuple[float, list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compiled_serve.models.default_model import default_model_path

    path = Path(default_model_path())
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok([PROMPT] * batch, return_tensors="pt")
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        model.generate(**tok([PROMPT], return_tensors="pt"), max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        out = model.generate(**ids, **kwargs)
        seconds = time.perf_counter() - start
    new = out[:, ids.input_ids.shape[1]:]
    return new.numel() / seconds, new[0].tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-mode", default="inductor", choices=["inductor", "graph"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_throughput.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for batch in (1, 16):
        ours, our_tokens = bench_ours(args.compile_mode, batch)
        theirs, hf_tokens = bench_transformers(batch)
        rows.append({"workload": f"smollm2-135m fp32, 19-tok prompt, {NEW_TOKENS} out, batch {batch}",
                     "batch": batch, "compiled_serve_tok_s": round(ours, 2), "transformers_tok_s": round(theirs, 2),
                     "ratio": round(ours / theirs, 2), "same_greedy_text": our_tokens == hf_tokens})
    result = {
        "date": datetime.date.today().isoformat(), "hardware": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads", "torch": torch.__version__, "compile_mode": args.compile_mode,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'workload':<55} {'ours tok/s':>10} {'HF tok/s':>9} {'ratio':>6} same")
    for r in rows:
        print(f"{r['workload']:<55} {r['compiled_serve_tok_s']:>10} {r['transformers_tok_s']:>9} "
              f"{r['ratio']:>6} {r['same_greedy_text']}")
    print(f"{result['hardware']}; torch {result['torch']}; {result['date']}")


if __name__ == "__main__":
    main()
