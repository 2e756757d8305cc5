"""CPU output tok/s of the embedded SmolLM2-135M, single stream and batched, beside transformers and,
when it is installed (the optional `bench` extra), llama.cpp on the same GGUF, in the same run.

Workload (../shared/PERF.md, CPU section): a 19-token prompt, 128 greedy tokens, EOS ignored;
single stream and a batch of 16, `--reps` timed runs each after a warm-up run. Each engine runs in
a subprocess of its own, so its peak RSS is its own:
  ours-<q>      `LLM(quantization=q)` for each q of --quantization (none: fp32 on the dequantized
                weights; gguf: the file's Q4_1 blocks through the int4 kernel)
  transformers  fp32 `generate` on the same dequantized weights (the greedy-text reference: its
                tokens, and its top-2 logit gap per step, so a divergence at a near-tie is told
                apart from an error)
  llama.cpp     llama-cpp-python on the GGUF as it is (single stream only: its high-level API runs
                one sequence at a time)
The machine is shared: every run records the load average next to its figures; read the spread.
Writes bench/results/cpu_throughput.json and prints one table.

    python bench/cpu_throughput.py [--compile-mode inductor|graph] [--threads 2] [--reps 3]
                                   [--quantization none,gguf]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPT = "Write a short story about a robot who learns to paint. The robot lived in a"
NEW_TOKENS = 128  # --new-tokens; the PERF.md workload is 128
BATCHES = (1, 16)


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def _rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _timed(run, batch: int, reps: int) -> tuple[list[float], list[str], list[int]]:
    """tok/s per repeat (after one warm-up run), the load average at each, the last run's tokens."""
    run(batch)
    rates, loads, tokens = [], [], []
    for _ in range(reps):
        start = time.perf_counter()
        n, tokens = run(batch)
        rates.append(round(n / (time.perf_counter() - start), 2))
        loads.append(_load())
    return rates, loads, tokens


def child_ours(quantization: str, mode: str, reps: int) -> dict:
    from compiled_serve import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(compile_mode=mode, max_num_seqs=64, quantization=quantization)
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

    def run(batch: int) -> tuple[int, list[int]]:
        outs = llm.generate([PROMPT] * batch, params, use_progress=False)
        return sum(len(o.outputs[0].token_ids) for o in outs), list(outs[0].outputs[0].token_ids)

    rows = {}
    for batch in BATCHES:
        rates, loads, tokens = _timed(run, batch, reps)
        rows[batch] = {"tok_s": rates, "load": loads, "tokens": tokens}
    return {"engine": f"ours-{quantization}", "quantization": llm.llm_engine.quantization,
            "startup_s": round(startup, 1), "peak_rss_mb": _rss_mb(), "rows": rows}


def child_transformers(reps: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compiled_serve.models.default_model import default_model_path

    path = Path(default_model_path())
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)

    def run(batch: int) -> tuple[int, list[int]]:
        ids = tok([PROMPT] * batch, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, **kwargs)
        new = out[:, ids.input_ids.shape[1]:]
        return new.numel(), new[0].tolist()

    rows = {}
    for batch in BATCHES:
        rates, loads, tokens = _timed(run, batch, reps)
        rows[batch] = {"tok_s": rates, "load": loads, "tokens": tokens}
    with torch.inference_mode():  # the reference's top-2 gap at each greedy step (near-tie rule)
        out = model.generate(**tok([PROMPT], return_tensors="pt"), **kwargs, output_scores=True,
                             return_dict_in_generate=True)
    top2 = [torch.topk(s[0].float(), 2) for s in out.scores]
    gaps = [round(float(t.values[0] - t.values[1]), 4) for t in top2]
    runner_up = [int(t.indices[1]) for t in top2]
    return {"engine": "transformers", "peak_rss_mb": _rss_mb(), "rows": rows, "gaps": gaps, "runner_up": runner_up}


def child_llama_cpp(threads: int, reps: int) -> dict:
    from llama_cpp import Llama  # the optional `bench` extra

    from compiled_serve.models.default_model import default_model_path

    llm = Llama(model_path=default_model_path(), n_threads=threads, n_ctx=512, verbose=False)
    eos = llm.token_eos()

    def run(batch: int) -> tuple[int, list[int]]:
        out = llm.create_completion(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0, logit_bias={eos: -1e9})
        return out["usage"]["completion_tokens"], []

    rates, loads, _ = _timed(run, 1, reps)
    return {"engine": "llama.cpp", "peak_rss_mb": _rss_mb(), "rows": {1: {"tok_s": rates, "load": loads}}}


def near_tie_agreement(tokens: list[int], ref_tokens: list[int], gaps: list[float], runner_up: list[int],
                       clear_gap: float) -> dict:
    """First divergence from the reference's greedy tokens; it agrees under the near-tie rule only
    where the reference's top-2 gap there is small and the engine took the reference's second
    choice (a broken engine emitting one token over and over diverges at once, maybe at a near
    tie, but not to the runner-up)."""
    first = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
    if len(tokens) != len(ref_tokens) and first is None:
        first = min(len(tokens), len(ref_tokens))
    near_tie = first is not None and first < len(gaps) and gaps[first] <= clear_gap
    took_runner_up = near_tie and first < len(tokens) and tokens[first] == runner_up[first]
    return {"same_tokens": first is None, "first_divergence": first,
            "ref_top2_gap_there": None if first is None or first >= len(gaps) else gaps[first],
            "took_ref_runner_up": None if first is None else took_runner_up,
            "agrees_under_near_tie_rule": first is None or took_runner_up}


def _spawn(args: list[str]) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        print(f"{args[0]}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-mode", default="inductor", choices=["inductor", "graph"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="greedy tokens per sequence")
    ap.add_argument("--quantization", default="none,gguf", help="ours, one run per value (comma-separated)")
    ap.add_argument("--clear-gap", type=float, default=0.5,
                    help="reference top-2 gap above which a quantized engine must pick the same token")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_throughput.json"))
    args = ap.parse_args()
    globals()["NEW_TOKENS"] = args.new_tokens  # the children read it
    torch.set_num_threads(args.threads)
    if args.child:
        kind, *rest = args.child
        result = (child_ours(rest[0], args.compile_mode, args.reps) if kind == "ours"
                  else child_transformers(args.reps) if kind == "transformers"
                  else child_llama_cpp(args.threads, args.reps))
        print(json.dumps(result))
        return
    common = ["--threads", str(args.threads), "--reps", str(args.reps), "--compile-mode", args.compile_mode,
              "--new-tokens", str(args.new_tokens)]
    runs = [_spawn(["ours", q, *common]) for q in args.quantization.split(",")]
    ref = _spawn(["transformers", *common])
    try:
        import llama_cpp  # noqa: F401

        runs.append(_spawn(["llama_cpp", *common]))
    except ImportError:
        print("llama-cpp-python is not installed (pip install '.[bench]'): llama.cpp not run", file=sys.stderr)
    engines = [r for r in [*runs, ref] if r is not None]
    for r in engines:
        for batch, row in r["rows"].items():
            row["median_tok_s"] = statistics.median(row["tok_s"])
            if ref is not None and r is not ref and row.get("tokens") and str(batch) == "1":
                row.update(near_tie_agreement(row["tokens"], ref["rows"]["1"]["tokens"], ref["gaps"], ref["runner_up"],
                                               args.clear_gap))
    result = {
        "date": datetime.date.today().isoformat(),
        "hardware": f"{platform.processor() or platform.machine()}, {args.threads} threads, shared VM",
        "torch": torch.__version__, "compile_mode": args.compile_mode, "reps": args.reps,
        "workload": f"smollm2-135m, 19-tok prompt, {NEW_TOKENS} greedy out, batch {BATCHES}",
        "engines": engines,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'engine':<14} {'batch':>5} {'tok/s median':>12} {'tok/s runs':<28} {'RSS MB':>7} greedy")
    for r in engines:
        for batch, row in r["rows"].items():
            same = row.get("agrees_under_near_tie_rule", "")
            print(f"{r['engine']:<14} {batch:>5} {row['median_tok_s']:>12} {str(row['tok_s']):<28} "
                  f"{r['peak_rss_mb']:>7} {same}")
    print(f"{result['hardware']}; torch {result['torch']}; {result['date']}")


if __name__ == "__main__":
    main()
