"""`compiled-serve bench {throughput,latency,serve,report}`.

    compiled-serve bench throughput              # W1 and W2, each in a fresh process
    compiled-serve bench latency                 # W3
    compiled-serve bench serve [--rates 2 8 32]  # W4 against a server it starts (or --url)
    compiled-serve bench report                  # docs/benchmarks.md + its PNG from bench/results/

Engine settings not given on the command line come from `bench.defaults.ENGINE_DEFAULTS`, then
from EngineConfig. Importing this module stays light: the runs import torch when they start.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from compiled_serve.bench.defaults import (
    DOCS_PAGE,
    ENGINE_DEFAULTS,
    LATENCY_REPEATS,
    RESULTS_DIR,
    SERVE_RATES,
)
from compiled_serve.bench.workloads import WORKLOADS, Workload, modified_workload
from compiled_serve.config import EngineConfig

# EngineConfig fields a bench run can set, with their types.
_ENGINE_FLAGS: dict[str, type] = {
    "dtype": str, "device": str, "seed": int, "compile_mode": str, "max_num_seqs": int,
    "max_num_batched_tokens": int, "max_model_len": int, "num_kv_blocks": int, "block_size": int,
    "gpu_memory_utilization": float, "cpu_kv_cache_gib": float, "scheduling": str,
    # Tensor parallel; `--distributed-executor-backend mp` at TP=1: W3 through the worker path
    # (engine/tp_engine.py) against the in-process engine (issue 12).
    "tensor_parallel_size": int, "distributed_executor_backend": str,
    # Weight quantization and the KV cache's dtype (issue 13: FP8 W2/W3 against our bf16 runs).
    "quantization": str, "kv_cache_dtype": str,
}
# Workload changes (small runs on CPU, tests); any of them marks the run "modified".
_WORKLOAD_FLAGS: dict[str, tuple[type, str]] = {
    "model": (str, "another model: a preset, a config.json or a model directory"),
    "num_requests": (int, "another request count"),
    "scale": (float, "multiply the prompt and output length bounds"),
    "max_prompt_len": (int, "cap the prompt length bounds"),
    "max_output_len": (int, "cap the output length bounds"),
}
_COMMANDS = {"throughput": ("W1", "W2"), "latency": ("W3",), "serve": ("W4",)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_bench_parser(commands: Any) -> None:
    bench = commands.add_parser("bench", help="the PERF.md workloads, their floor, and the report")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, ids in _COMMANDS.items():
        parser = sub.add_parser(name, help="; ".join(WORKLOADS[i].describe() for i in ids))
        parser.add_argument("--workload", nargs="+", choices=ids, default=list(ids))
        for field, kind in _ENGINE_FLAGS.items():
            default = ENGINE_DEFAULTS.get(field, EngineConfig.field_defaults()[field])
            parser.add_argument(_flag(field), dest=field, type=kind, default=None, help=f"(default: {default!r})")
        parser.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs")
        for field, (kind, text) in _WORKLOAD_FLAGS.items():
            parser.add_argument(_flag(field), dest=field, type=kind, default=None, help=text)
        parser.add_argument("--results-dir", default=RESULTS_DIR, help=f"(default: {RESULTS_DIR})")
        parser.add_argument("--record-json", default=None, help=argparse.SUPPRESS)  # a child's record
        if name == "latency":
            parser.add_argument("--repeats", type=int, default=LATENCY_REPEATS, help="runs of the request")
        if name == "serve":
            parser.add_argument("--rates", type=float, nargs="+", default=list(SERVE_RATES),
                                help=f"requests per second (default: {' '.join(map(str, SERVE_RATES))})")
            parser.add_argument("--url", default=None, help="a running server instead of starting one")
    report = sub.add_parser("report", help=f"regenerate {DOCS_PAGE} and its plot from the bench JSON")
    report.add_argument("--results-dir", default=RESULTS_DIR)
    report.add_argument("--docs", default=DOCS_PAGE, help=f"the page to regenerate (default: {DOCS_PAGE})")


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every engine setting a bench run can change: the flag, else ENGINE_DEFAULTS, else EngineConfig's."""
    names = [*_ENGINE_FLAGS, "enforce_eager"]
    config_defaults = EngineConfig.field_defaults()
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return {**{name: config_defaults[name] for name in names}, **ENGINE_DEFAULTS, **given}


def selected_workload(args: argparse.Namespace, workload_id: str) -> Workload:
    return modified_workload(WORKLOADS[workload_id], **{name: getattr(args, name) for name in _WORKLOAD_FLAGS})


def _child_argv(args: argparse.Namespace, workload_id: str, record_path: str) -> list[str]:
    argv = ["bench", args.bench_command, "--workload", workload_id, "--record-json", record_path,
            "--results-dir", args.results_dir]
    for name in [*_ENGINE_FLAGS, *_WORKLOAD_FLAGS, "repeats", "url"]:
        value = getattr(args, name, None)
        if value is not None:
            argv += [_flag(name), str(value)]
    if args.enforce_eager:
        argv.append("--enforce-eager")
    if args.bench_command == "serve":
        argv += ["--rates", *map(str, args.rates)]
    return argv


def _run_in_child(args: argparse.Namespace, workload_id: str) -> dict[str, Any]:
    """PERF.md: each engine in a fresh process (one engine's memory never shapes the next's)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "record.json")
        cmd = [sys.executable, "-m", "compiled_serve.cli", *_child_argv(args, workload_id, path)]
        done = subprocess.run(cmd)
        if done.returncode != 0:
            raise SystemExit(f"compiled-serve bench: {workload_id} failed ({done.returncode})")
        return json.loads(Path(path).read_text())


def run_bench(args: argparse.Namespace) -> int:
    from compiled_serve.bench import report, table

    if args.bench_command == "report":
        return report.regenerate(Path(args.results_dir), Path(args.docs))
    if len(args.workload) > 1:
        records = [_run_in_child(args, workload_id) for workload_id in args.workload]
    else:
        from compiled_serve.bench.run import run_workload

        record = run_workload(selected_workload(args, args.workload[0]), engine_settings(args),
                              repeats=getattr(args, "repeats", 1), rates=getattr(args, "rates", None),
                              url=getattr(args, "url", None))
        record["file"] = str(report.write_record(record, Path(args.results_dir)))
        if args.record_json:
            Path(args.record_json).write_text(json.dumps(record))
            return 0  # the parent prints the table
        records = [record]
    table.print_records(records)
    return 0
