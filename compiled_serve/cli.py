"""`compiled-serve` command line. Defaults come from the config dataclasses' fields.

    compiled-serve serve [--model M] [--host 127.0.0.1] [--port 8000] [--api-key K] ...
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from compiled_serve.config import EngineConfig
from compiled_serve.errors import CompiledServeError
from compiled_serve.server.config import ServerConfig

# EngineConfig fields exposed on the command line, with their types (None-default fields need one).
_ENGINE_FLAGS: dict[str, type] = {
    "model": str, "load_format": str, "dtype": str, "device": str, "seed": int, "tokenizer": str,
    "block_size": int, "gpu_memory_utilization": float, "cpu_kv_cache_gib": float, "num_kv_blocks": int,
    "max_num_seqs": int, "max_num_batched_tokens": int, "max_model_len": int, "max_logprobs": int,
    "max_n": int, "compile_mode": str, "build_dir": str, "build_fallback": str,
}
_SERVER_FLAGS: dict[str, type] = {
    "host": str, "port": int, "api_key": str, "max_waiting_requests": int, "retry_after_s": int,
    "max_request_body_bytes": int, "max_header_count": int, "max_header_bytes": int,
    "max_total_header_bytes": int, "chat_template_file": str, "shutdown_timeout_s": float,
}
_RENAMED = {"chat_template_file": "--chat-template"}


def _flag(name: str) -> str:
    return _RENAMED.get(name, "--" + name.replace("_", "-"))


def _add_fields(parser: argparse.ArgumentParser, flags: dict[str, type], defaults: dict[str, object]) -> None:
    for name, kind in flags.items():
        default = defaults[name]
        parser.add_argument(_flag(name), dest=name, type=kind, default=default,
                            help=f"(default: {default!r})" if name != "api_key" else "(default: none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compiled-serve", description="An LLM engine built on a graph compiler.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server (loopback by default)")
    engine_defaults = EngineConfig.field_defaults()
    _add_fields(serve, _ENGINE_FLAGS, engine_defaults)
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=engine_defaults["enable_prefix_caching"])
    _add_fields(serve, _SERVER_FLAGS, ServerConfig.field_defaults())
    serve.add_argument("--served-model-name", dest="served_model_names", nargs="+", default=None,
                       help="names the model answers to (default: the model's name)")
    serve.add_argument("--allow-request-chat-template", action="store_true",
                       help="let requests supply their own (sandboxed) chat template")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    from compiled_serve.build.command import add_compile_parser, add_pass_flags

    add_pass_flags(serve)
    add_compile_parser(commands)
    from compiled_serve.bench.cli import add_bench_parser

    add_bench_parser(commands)
    return parser


def _configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    engine = EngineConfig(**{name: getattr(args, name) for name in _ENGINE_FLAGS},
                          enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
                          extra_passes=tuple(args.extra_passes), disabled_passes=tuple(args.disabled_passes))
    server_args: dict[str, Any] = {name: getattr(args, name) for name in _SERVER_FLAGS}
    server_args["api_key"] = server_args["api_key"] or os.environ.get("COMPILED_SERVE_API_KEY") or None
    served = tuple(args.served_model_names) if args.served_model_names else None
    server = ServerConfig(**server_args, served_model_names=served,
                          allow_request_chat_template=args.allow_request_chat_template)
    return engine, server


def _print_report(report: dict[str, Any], server: ServerConfig) -> None:
    print("compiled-serve: loaded")
    for key, value in report.items():
        print(f"  {key:<18} {value}")
    print(f"  {'listening':<18} http://{server.host}:{server.port}"
          f"{'' if server.api_key is None else '  (API key required)'}", flush=True)
    if not server.is_loopback:
        print(f"  warning: listening on {server.host}, not loopback; set --api-key", file=sys.stderr)


def _refuse_engine_flags_for_embeddings(args: argparse.Namespace) -> None:
    """The embedding model reads only --model and --device; any other engine flag would do nothing."""
    defaults = EngineConfig.field_defaults()
    ignored = [_flag(name) for name in _ENGINE_FLAGS
               if name not in ("model", "device") and getattr(args, name) != defaults[name]]
    if ignored:
        raise CompiledServeError(f"{', '.join(ignored)} do(es) not apply to an embedding model "
                                 "(it reads only --model and --device)")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from compiled_serve.embedding import EmbeddingEngine, is_embedding_model
    from compiled_serve.server.app import build_app, uvicorn_config

    engine_config, server_config = _configs(args)
    if is_embedding_model(engine_config.model):
        _refuse_engine_flags_for_embeddings(args)
        device = "cuda" if engine_config.device == "cuda" else "cpu"
        embedder = EmbeddingEngine(engine_config.model, device=device)  # type: ignore[arg-type]
        app = build_app(server_config, embedder=embedder, model=engine_config.model)
        report = {"model": app.state.server.model_name, "architecture": "BertModel (embeddings)",
                  "dtype": "float32", "device": device, "max_seq_length": embedder.max_seq_length,
                  "dimension": embedder.dimension}
    else:
        from compiled_serve.engine.llm_engine import LLMEngine

        engine = LLMEngine(engine_config)
        app = build_app(server_config, engine=engine, model=engine_config.model)
        report = engine.startup_report()
    _print_report(report, server_config)
    uvicorn.Server(uvicorn_config(app, server_config, log_level=args.log_level)).run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "compile":
            from compiled_serve.build.command import run_compile

            return run_compile(args)
        if args.command == "bench":
            from compiled_serve.bench.cli import run_bench

            return run_bench(args)
    except CompiledServeError as exc:
        print(f"compiled-serve: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
