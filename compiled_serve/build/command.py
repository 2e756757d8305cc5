"""The `compiled-serve compile` subcommand (the parser lives beside `serve` in cli.py).

    compiled-serve compile [--model] M [--buckets 2,4,8] [--dtype D] [--pass SPEC] [--disable-pass NAME]
                           --build-dir DIR [--explain]    # --out DIR: deprecated spelling
    compiled-serve compile --model M ... --verify DIR      # recompile, compare manifests (CI)
    compiled-serve compile --model M --tensor-parallel-size N --build-dir DIR   # one build per rank
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from compiled_serve.cli_flags import add_fields, add_positional_model
from compiled_serve.config import EngineConfig
from compiled_serve.engine.buckets import parse_buckets

# EngineConfig fields that change a build (the rest are serving knobs).
COMPILE_FLAGS: dict[str, type] = {
    "model": str, "load_format": str, "dtype": str, "quantization": str, "device": str, "seed": int, "block_size": int,
    "max_num_seqs": int, "max_num_batched_tokens": int, "max_model_len": int, "num_kv_blocks": int,
    "gpu_memory_utilization": float, "compile_mode": str, "tensor_parallel_size": int,
}


def add_pass_flags(parser: argparse.ArgumentParser) -> None:
    """--pass / --disable-pass: EngineConfig.extra_passes / disabled_passes (serve and compile)."""
    parser.add_argument("--pass", dest="extra_passes", action="append", default=[], metavar="SPEC",
                        help="add a graph pass: a built-in name or 'pkg.module:PassClass' (repeatable)")
    parser.add_argument("--disable-pass", dest="disabled_passes", action="append", default=[], metavar="NAME",
                        help="leave a pass out by name (repeatable; paged-attention is required)")


class _DeprecatedOut(argparse.Action):
    """`compile --out DIR`, the old spelling of `--build-dir DIR`: still works, and says so."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        import sys

        print("compiled-serve: warning: `compile --out` is deprecated; use --build-dir (the flag serve reads "
              "the directory with)", file=sys.stderr)
        namespace.build_dir = values


def add_compile_parser(commands: Any) -> None:
    parser = commands.add_parser("compile", help="prebuild and persist what a server needs (warm start)")
    add_positional_model(parser)
    add_fields(parser, COMPILE_FLAGS, EngineConfig.field_defaults())
    parser.add_argument("--buckets", type=parse_buckets, default=None,
                        help="decode batch buckets, e.g. 2,4,8 (default: 2,4,8,16,...,max_num_seqs)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    add_pass_flags(parser)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--build-dir", dest="build_dir", metavar="DIR",
                        help="build directory to save into (the flag `serve --build-dir` reads it with)")
    target.add_argument("--out", dest="build_dir", metavar="DIR", action=_DeprecatedOut, help=argparse.SUPPRESS)
    target.add_argument("--verify", metavar="DIR", help="recompile and compare with the build stored in DIR")
    parser.add_argument("--explain", action="store_true", help="print the build key, pass report and log")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no spinner on the terminal (the log lines stay)")


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    fields = {name: getattr(args, name) for name in COMPILE_FLAGS}
    return EngineConfig(**fields, cuda_graph_buckets=args.buckets, enforce_eager=args.enforce_eager,
                        extra_passes=tuple(args.extra_passes), disabled_passes=tuple(args.disabled_passes))


def run_compile(args: argparse.Namespace) -> int:
    from compiled_serve.build.compile import compile_build, verify_build

    config = config_from_args(args)
    if args.verify:
        same, differences = verify_build(config, args.verify, show_progress=args.progress)
        if same:
            print(f"compiled-serve: build in {args.verify} verified: a recompile gives the same manifest")
            return 0
        print(f"compiled-serve: build in {args.verify} differs from a recompile:")
        for line in differences:
            print(f"  {line}")
        return 1
    result = compile_build(config, args.build_dir, show_progress=args.progress)
    report = result.report
    print(f"compiled-serve: build {result.key.digest()[:12]} saved to {result.path}"
          + (" (tensor-parallel rank 0)" if result.rank_builds else ""))
    for rank_build in result.rank_builds:
        print(f"compiled-serve: tensor-parallel rank {rank_build['rank']}: build {os.path.basename(rank_build['path'])[:12]} "
              f"saved to {rank_build['path']} (manifest {rank_build['manifest_hash'][:12]}, "
              f"{rank_build['num_artifacts']} artifacts)")
    print(f"  manifest {result.manifest_hash[:12]}, {len(result.artifacts)} artifacts, "
          f"{report['artifact_bytes'] / 2**20:.1f} MiB")
    print(f"  load {report['load_seconds']:.1f}s, compile {report['compile_seconds']:.1f}s, "
          f"total {report['total_seconds']:.1f}s; buckets {report['buckets']}; cuda graphs: {report['cuda_graphs']}")
    if args.explain:
        print("build key:")
        print(json.dumps(result.key.to_dict(), indent=2))
        print("passes per graph:")
        pass_report = json.loads(result.artifacts["pass_report.json"])
        for kind, label in (("graphs", "model graph"), ("logits_tail_graphs", "logits-tail graph")):
            for i, graph in enumerate(pass_report.get(kind, []), 1):
                print(f"  {label} {i}: matches {graph['matches']}")
                changed = {op: (graph["ops_before"].get(op, 0), n) for op, n in graph["ops_after"].items()
                           if graph["ops_before"].get(op, 0) != n}
                gone = {op: (n, 0) for op, n in graph["ops_before"].items() if op not in graph["ops_after"]}
                print(f"    ops changed (before, after): {changed | gone}")
        print("log:")
        for line in result.log:
            print(f"  {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m compiled_serve.build.command compile ...`: the same command without the server's imports."""
    import sys

    from compiled_serve.errors import CompiledServeError

    parser = argparse.ArgumentParser(prog="compiled-serve")
    add_compile_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return run_compile(args)
    except CompiledServeError as exc:
        print(f"compiled-serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
