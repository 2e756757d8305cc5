"""Resident memory of the CPU engine on the embedded model, per --quantization, each in its own process.

For each q of --quantization: VmRSS after `import torch`, after `import compiled_serve`, after
`LLM(quantization=q)` (load, compile, warm-up), after a short generate (one prompt, 16 tokens: the
issue's "resident memory" figure, as docs/perf-notes.md measured it before), and after the
cpu_throughput workload (one sequence then 16, 128 greedy tokens each, twice), plus the process's
peak (ru_maxrss), the KV cache's budget and the weights' bytes. Writes bench/results/cpu_memory.json.

    python bench/cpu_memory.py [--quantization none,gguf] [--cpu-kv-cache-gib 1.0] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
from pathlib import Path

PROMPT = "Write a short story about a robot who learns to paint. The robot lived in a"


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


def child(quantization: str, kv_gib: float | None, threads: int) -> dict:
    rss = {}
    import torch

    torch.set_num_threads(threads)
    rss["import_torch"] = _rss_mb()
    from compiled_serve import LLM, SamplingParams

    rss["import_compiled_serve"] = _rss_mb()
    kwargs = {} if kv_gib is None else {"cpu_kv_cache_gib": kv_gib}
    llm = LLM(compile_mode="inductor", max_num_seqs=64, quantization=quantization, **kwargs)
    rss["engine_ready"] = _rss_mb()
    llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=16), use_progress=False)
    rss["after_short_generate"] = _rss_mb()
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    for _ in range(2):
        for batch in (1, 16):
            llm.generate([PROMPT] * batch, params, use_progress=False)
    rss["after_throughput_workload"] = _rss_mb()
    engine = llm.llm_engine
    kv = engine.kv_caches
    model = engine.model
    weight_bytes = 0
    for p in list(model.parameters()) + list(model.buffers()):
        qw = getattr(p, "quantized_weight", None)
        if qw is not None:
            weight_bytes += sum(t.numel() * t.element_size() for t in vars(qw).values() if isinstance(t, torch.Tensor))
        elif p.stride() and min(p.stride()) > 0:
            weight_bytes += p.numel() * p.element_size()
    return {"quantization": engine.quantization, "rss_mb": rss,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "kv_cache_budget_mb": round(sum(t.numel() * t.element_size() for t in kv) / 2**20, 1),
            "kv_blocks": engine.block_manager.num_blocks if hasattr(engine.block_manager, "num_blocks") else None,
            "weights_mb": round(weight_bytes / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", default="none,gguf")
    ap.add_argument("--cpu-kv-cache-gib", type=float, default=None, help="default: the engine's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_memory.json"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.cpu_kv_cache_gib, args.threads)))
        return
    runs = []
    for q in args.quantization.split(","):
        cmd = [sys.executable, __file__, "--child", q, "--threads", str(args.threads)]
        if args.cpu_kv_cache_gib is not None:
            cmd += ["--cpu-kv-cache-gib", str(args.cpu_kv_cache_gib)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            print(f"{q}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        runs.append(json.loads(lines[-1]))
        print(lines[-1])
    result = {"date": datetime.date.today().isoformat(), "threads": args.threads,
              "cpu_kv_cache_gib": args.cpu_kv_cache_gib or "engine default", "runs": runs}
    base = next((r for r in runs if r["quantization"] == "none"), None)
    if base:
        result["ratio_to_fp32"] = {r["quantization"]: {k: round(v / base["rss_mb"][k], 3) for k, v in r["rss_mb"].items()}
                                   for r in runs if r is not base}
    out = Path(args.out)
    if out.exists():  # keep earlier configurations (another KV budget) beside this one
        old = json.loads(out.read_text())
        configs = [c for c in old.get("configs", [old]) if c.get("cpu_kv_cache_gib") != result["cpu_kv_cache_gib"]]
    else:
        configs = []
    out.write_text(json.dumps({"configs": [*configs, result]}, indent=1) + "\n")
    print(json.dumps(result.get("ratio_to_fp32")))


if __name__ == "__main__":
    main()
