"""Compile benchmark: cold compile, warm start from a persisted build, decode step per bucket.

    python bench/compile_bench.py [--model llama-3.1-8b] [--max-num-seqs 128]

1. cold: `compiled-serve compile` in a fresh process with an empty Inductor cache (every bucket:
   both graph shapes compiled, every decode bucket captured), saved to a build directory;
2. warm: a fresh process with another empty Inductor cache starts an engine from that build
   (process start to ready, compile overhead, cache hits);
3. decode: in the warm process, one decode step (model forward, logits excluded) per bucket at a
   512-token context, through the CUDA graph and through the compiled dynamic graph without one.
Writes JSON (hardware, date, versions) to $OUT if set, else bench/results/, and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 512


def engine_args(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--load-format", "dummy", "--max-num-seqs", str(args.max_num_seqs),
            "--device", args.device, "--compile-mode", args.compile_mode, "--max-model-len", "4096",
            *[f"--disable-pass={name}" for name in args.disable_pass]]


def cold_compile(args: argparse.Namespace, build_dir: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="bench-cold-")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "compiled_serve.build.command", "compile", *engine_args(args),
                           "--out", str(build_dir), "--no-progress"], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    print(proc.stdout + proc.stderr[-3000:], flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"compile failed ({proc.returncode})")
    (build,) = [b for b in _store(build_dir).list()]
    report = dict(build.manifest.report)
    report.pop("log", None)
    return {"process_wall_s": round(wall, 2), **report}


def _store(path: Path):
    from compiled_serve.cache import ArtifactStore

    return ArtifactStore(path)


def warm_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: start from the build, then time decode steps per bucket."""
    t_process = float(os.environ["BENCH_T0"])
    import torch
    from torch._dynamo.utils import counters

    from compiled_serve.config import EngineConfig
    from compiled_serve.engine.llm_engine import LLMEngine
    from compiled_serve.kernels.forward_context import AttentionMetadata, forward_context

    config = EngineConfig(model=args.model, load_format="dummy", max_num_seqs=args.max_num_seqs, device=args.device,
                          compile_mode=args.compile_mode, max_model_len=4096, build_dir=args.build_dir,
                          disabled_passes=tuple(args.disable_pass))
    profiler = _profiler(args)
    engine = LLMEngine(config)
    ready = time.time() - t_process
    _dump_profile(profiler, args, "warm_start")
    report = engine.startup_report()
    result: dict = {
        "process_start_to_ready_s": round(ready, 2), "load_seconds": round(engine.load_seconds, 2),
        "compile_seconds": round(engine.compile_seconds, 2), "build": report["build"],
        "cuda_graphs": report["cuda_graphs"], "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"], "decode": {},
    }
    runner, dev, bs = engine.runner, engine.device, engine.config.block_size
    graphs = runner.decode_graphs
    per_seq = CONTEXT // bs
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for b in engine.decode_buckets:
        if b * per_seq > engine.block_manager.num_blocks:
            continue
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)]
        ids, pos = [1] * b, [CONTEXT - 1] * b
        slots = [t[-1] * bs + bs - 1 for t in tables]
        lens = [CONTEXT] * b

        def eager_step(b=b, ids=ids, pos=pos, slots=slots, lens=lens, tables=tables) -> None:
            meta = AttentionMetadata(
                slot_mapping=torch.tensor(slots, device=dev), block_tables=torch.tensor(tables, dtype=torch.int32,
                                                                                        device=dev),
                seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
                query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=dev), max_query_len=1,
                max_seq_len=CONTEXT, kv_caches=runner.kv_caches, seq_lens_host=lens,
                query_start_loc_host=list(range(b + 1)))
            with forward_context(meta):
                runner.step_fn(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev))

        def graph_step(ids=ids, pos=pos, slots=slots, lens=lens, tables=tables) -> None:
            graphs.run(ids, pos, slots, lens, tables)

        row = {}
        for name, fn in (("eager_ms", eager_step), ("graph_ms", graph_step if graphs else None)):
            if fn is None:
                continue
            with torch.inference_mode():
                for _ in range(3):
                    fn()
                sync()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                sync()
            row[name] = round((time.perf_counter() - t0) / args.iters * 1e3, 3)
        result["decode"][str(b)] = row
        print(f"bucket {b}: {row}", flush=True)
        if b == 8 and args.profile:
            profiler = _profiler(args)
            with torch.inference_mode():
                for _ in range(10):
                    eager_step()
                sync()
            _dump_profile(profiler, args, "dynamic_step_x10_bucket8")
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def _profiler(args: argparse.Namespace):
    if not args.profile:
        return None
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def _dump_profile(profiler, args: argparse.Namespace, name: str) -> None:
    """Top functions by cumulative and by own time, to $OUT (or bench/results/logs)."""
    if profiler is None:
        return
    import io
    import pstats

    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(60)
    stats.sort_stats("tottime").print_stats(40)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "results" / "logs"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"profile-{name}.txt").write_text(out.getvalue())


def warm_start(args: argparse.Namespace, build_dir: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="bench-warm-"),
           "BENCH_T0": repr(time.time())}
    proc = subprocess.run([sys.executable, __file__, "--child", "--build-dir", str(build_dir), "--model", args.model,
                           "--max-num-seqs", str(args.max_num_seqs), "--device", args.device, "--compile-mode",
                           args.compile_mode, "--iters", str(args.iters), *(["--profile"] if args.profile else []),
                           *[f"--disable-pass={name}" for name in args.disable_pass]],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"warm start failed ({proc.returncode})")
    return json.loads(lines[-1].removeprefix("BENCH_RESULT "))


def environment(device: str) -> dict:
    import torch

    from compiled_serve.cache.build_key import current_toolchain

    tc = current_toolchain(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"hardware": name, "device_capability": tc.device_capability, "torch": tc.torch_version,
            "triton": tc.triton_version, "python": sys.version.split()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpus": os.cpu_count()}


def print_table(result: dict) -> None:
    cold, warm = result["cold"], result["warm"]
    print(f"\n{result['model']} on {result['env']['hardware']} (torch {result['env']['torch']}, "
          f"triton {result['env']['triton']}, {result['env']['date']})")
    print(f"{'phase':<34}{'seconds':>10}")
    print(f"{'cold compile (engine compile)':<34}{cold['compile_seconds']:>10.1f}")
    print(f"{'cold compile (process wall)':<34}{cold['process_wall_s']:>10.1f}")
    print(f"{'warm start: compile overhead':<34}{warm['compile_seconds']:>10.2f}")
    print(f"{'warm start: process start to ready':<34}{warm['process_start_to_ready_s']:>10.1f}")
    print(f"warm start: {warm['build']}; fx graph cache hits {warm['fxgraph_cache_hit']}, "
          f"misses {warm['fxgraph_cache_miss']}")
    print(f"\ndecode step (forward only, context {CONTEXT}), ms")
    print(f"{'bucket':>8}{'compiled':>12}{'cuda graph':>12}{'speedup':>10}")
    for b, row in warm["decode"].items():
        g = row.get("graph_ms")
        speed = f"{row['eager_ms'] / g:.2f}x" if g else "-"
        print(f"{b:>8}{row['eager_ms']:>12.3f}{(g if g else float('nan')):>12.3f}{speed:>10}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile-mode", default="inductor")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--timeout", type=int, default=400)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--disable-pass", action="append", default=[], help="leave a graph pass out")
    parser.add_argument("--tag", default="", help="suffix for the result file name")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the warm start and 10 graph-less decode steps at bucket 8")
    parser.add_argument("--build-dir")
    args = parser.parse_args()
    if args.child:
        return warm_child(args)
    build_dir = Path(tempfile.mkdtemp(prefix="bench-build-"))
    result = {"model": args.model, "max_num_seqs": args.max_num_seqs, "compile_mode": args.compile_mode,
              "disabled_passes": args.disable_pass,
              "env": environment(args.device)}
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"compile_bench-{args.device}{args.tag}.json"
    result["cold"] = cold_compile(args, build_dir)
    path.write_text(json.dumps(result, indent=2))
    result["warm"] = warm_start(args, build_dir)
    path.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
