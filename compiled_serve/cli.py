"""`compiled-serve` command line. Defaults come from the config dataclasses' fields.

    compiled-serve serve [MODEL] [--host 127.0.0.1] [--port 8000] [--api-key K] ...
    compiled-serve chat [MODEL] [--max-tokens N] [--temperature T] [--system TEXT]
    compiled-serve chat --url http://127.0.0.1:8000 [--model NAME] [--api-key K]
    compiled-serve compile [MODEL] --build-dir DIR
    compiled-serve bench {throughput,latency,serve,report}
    compiled-serve --version

Parsing imports neither torch nor FastAPI (`--help` stays fast); each command imports what it runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from compiled_serve.cli_flags import add_fields, add_positional_model, flag
from compiled_serve.config import EngineConfig
from compiled_serve.errors import CompiledServeError
from compiled_serve.server.config import ServerConfig

logger = logging.getLogger("compiled_serve.cli")

# EngineConfig fields exposed on the command line, with their types (None-default fields need one).
_ENGINE_FLAGS: dict[str, type] = {
    "model": str, "load_format": str, "dtype": str, "quantization": str, "kv_cache_dtype": str,
    "device": str, "seed": int,
    "tokenizer": str,
    "block_size": int, "gpu_memory_utilization": float, "cpu_kv_cache_gib": float, "num_kv_blocks": int,
    "max_num_seqs": int, "max_num_batched_tokens": int, "max_model_len": int, "max_logprobs": int,
    "max_n": int, "compile_mode": str, "build_dir": str, "build_fallback": str, "build_cache_gib": float,
    "tensor_parallel_size": int, "distributed_executor_backend": str, "distributed_interface": str,
    "scheduling": str,
    "structured_outputs_backend": str,
}
_SERVER_FLAGS: dict[str, type] = {
    "host": str, "port": int, "api_key": str, "max_waiting_requests": int, "retry_after_s": int,
    "max_request_body_bytes": int, "max_header_count": int, "max_header_bytes": int,
    "max_total_header_bytes": int, "chat_template_file": str, "shutdown_timeout_s": float,
    "tool_call_parser": str, "reasoning_parser": str, "log_stats_interval_s": float,
}
_LOG_LEVELS = ["debug", "info", "warning", "error"]


def version() -> str:
    try:
        return importlib.metadata.version("compiled-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    engine_defaults = EngineConfig.field_defaults()
    add_positional_model(parser)
    add_fields(parser, _ENGINE_FLAGS, engine_defaults)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=engine_defaults["enable_prefix_caching"],
                        help="reuse the KV cache of a shared prompt prefix across requests")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs for decode steps (CUDA only; CPU never uses them)")
    parser.add_argument("--build-cache", action=argparse.BooleanOptionalAction,
                        default=engine_defaults["build_cache"],
                        help="keep builds (and a GGUF model's loaded weights) in $COMPILED_SERVE_CACHE_ROOT "
                             "(default ~/.cache/compiled_serve), so the next start with the same settings loads "
                             "instead of compiling; --no-build-cache: compile every start and write nothing; "
                             "ignored with --build-dir")
    parser.add_argument("--log-level", default="info", choices=_LOG_LEVELS,
                        help="least severe log lines shown, on stderr (default: info)")
    from compiled_serve.build.command import add_pass_flags

    add_pass_flags(parser)


def _add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server (loopback by default)")
    _add_engine_flags(serve)
    add_fields(serve, _SERVER_FLAGS, ServerConfig.field_defaults())
    serve.add_argument("--served-model-name", dest="served_model_names", nargs="+", default=None,
                       help="names the model answers to in requests and /v1/models; "
                            "none: the model's file or directory name")
    serve.add_argument("--allow-request-chat-template", action="store_true",
                       help="let requests supply their own (sandboxed) chat template (default: off)")
    serve.add_argument("--disable-access-log", action="store_true",
                       help="no access-log line per request (method, path, status, latency, tokens) (default: off)")
    serve.add_argument("--engine-process", action=argparse.BooleanOptionalAction,
                       default=ServerConfig.field_defaults()["engine_process"],
                       help="run the engine in its own process, so HTTP and detokenization never hold its "
                            "GIL; --no-engine-process: on a thread of the server process")


def _add_chat_parser(commands: Any) -> None:
    from compiled_serve.sampling_params import SamplingParams

    chat = commands.add_parser("chat", help="chat with a model in the terminal: in-process, or with a running "
                                            "server through --url (stdin may be piped)")
    _add_engine_flags(chat)
    chat.add_argument("--url", default=None,
                      help="chat with a running OpenAI-compatible server at this address (http://host:port, with "
                           "or without /v1) instead of loading a model here; --model then names the server's "
                           "model (none: the first that /v1/models lists) and the engine flags are unused; "
                           "none: load the model in this process")
    chat.add_argument("--api-key", default=None,
                      help="with --url: the bearer token the server wants (its --api-key); none: send no "
                           "Authorization header")
    chat.add_argument("--chat-template", dest="chat_template_file", default=None,
                      help="a Jinja chat-template file used instead of the model's own; none: the model's own")
    chat.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens (default: 512)")
    chat.add_argument("--temperature", type=float, default=SamplingParams.temperature,
                      help=f"sampling temperature; 0: greedy (default: {SamplingParams.temperature})")
    chat.add_argument("--system", default=None, help="a system message opening the conversation; none: no system "
                                                     "message")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compiled-serve", description="An LLM engine built on a graph compiler.")
    parser.add_argument("--version", action="version", version=f"compiled-serve {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(commands)
    _add_chat_parser(commands)
    from compiled_serve.build.command import add_compile_parser

    add_compile_parser(commands)
    from compiled_serve.bench.cli import add_bench_parser

    add_bench_parser(commands)
    return parser


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{name: getattr(args, name) for name in _ENGINE_FLAGS},
                        enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
                        build_cache=args.build_cache,
                        extra_passes=tuple(args.extra_passes), disabled_passes=tuple(args.disabled_passes))


def _server_config(args: argparse.Namespace) -> ServerConfig:
    server_args: dict[str, Any] = {name: getattr(args, name) for name in _SERVER_FLAGS}
    server_args["api_key"] = server_args["api_key"] or os.environ.get("COMPILED_SERVE_API_KEY") or None
    served = tuple(args.served_model_names) if args.served_model_names else None
    return ServerConfig(**server_args, served_model_names=served,
                        allow_request_chat_template=args.allow_request_chat_template,
                        engine_process=args.engine_process, disable_access_log=args.disable_access_log)


def _configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    return _engine_config(args), _server_config(args)


def _print_report(report: dict[str, Any]) -> None:
    print("compiled-serve: loaded")
    for key, value in report.items():
        print(f"  {key:<18} {value}")
    sys.stdout.flush()


def _refuse_engine_flags_for_embeddings(args: argparse.Namespace) -> None:
    """The embedding model reads only --model and --device; any other engine flag would do nothing."""
    defaults = EngineConfig.field_defaults()
    ignored = [flag(name) for name in _ENGINE_FLAGS
               if name not in ("model", "device") and getattr(args, name) != defaults[name]]
    if ignored:
        raise CompiledServeError(f"{', '.join(ignored)} do(es) not apply to an embedding model "
                                 "(it reads only --model and --device)")


def serve(args: argparse.Namespace) -> int:
    from compiled_serve.server.listen import bind_socket

    engine_config, server_config = _configs(args)
    # The port first: a busy one is an error now, not after a minute of loading.
    sock = bind_socket(server_config.host, server_config.port)
    try:
        return _serve_on(sock, args, engine_config, server_config)
    finally:
        sock.close()


def _serve_on(sock: Any, args: argparse.Namespace, engine_config: EngineConfig, server_config: ServerConfig) -> int:
    # The app (FastAPI, pydantic models) is imported after the engine core has started: with an
    # engine process, EngineCoreClient.start imports it in a thread while the core loads.
    if _is_embedding_model(engine_config.model):
        from compiled_serve.embedding import EmbeddingEngine
        from compiled_serve.server.app import build_app

        _refuse_engine_flags_for_embeddings(args)
        device = "cuda" if engine_config.device == "cuda" else "cpu"
        embedder = EmbeddingEngine(engine_config.model, device=device)  # type: ignore[arg-type]
        app = build_app(server_config, embedder=embedder, model=engine_config.model)
        report = {"model": app.state.server.model_name, "architecture": "BertModel (embeddings)",
                  "dtype": "float32", "device": device, "max_seq_length": embedder.max_seq_length,
                  "dimension": embedder.dimension}
    elif server_config.engine_process:
        from compiled_serve.server.engine_client import EngineCoreClient

        engine = EngineCoreClient.start(engine_config, log_level=args.log_level)
        try:
            from compiled_serve.server.app import build_app

            app = build_app(server_config, engine=engine, model=engine_config.model)
            return _run_server(sock, args, app, server_config, engine.startup_report())
        finally:
            engine.close()  # after the server drained: the core exits (or is killed) within ~2 s
    else:
        from compiled_serve.startup import start_engine

        engine = start_engine(engine_config)
        from compiled_serve.server.app import build_app

        app = build_app(server_config, engine=engine, model=engine_config.model)
        report = engine.startup_report()
    return _run_server(sock, args, app, server_config, report)


def _is_embedding_model(model: str | None) -> bool:
    """Only a directory can be an embedding model: anything else is answered without importing
    torch here (the engine core imports it; this process need not, before the core starts)."""
    if model is None or not os.path.isdir(model):
        return False
    from compiled_serve.embedding import is_embedding_model

    return is_embedding_model(model)


def _run_server(sock: Any, args: argparse.Namespace, app: Any, server_config: ServerConfig,
                report: dict[str, Any]) -> int:
    from compiled_serve.long_lived_objects import freeze_long_lived_objects
    from compiled_serve.server.app import uvicorn_config
    from compiled_serve.server.listen import HTTPServer, socket_url

    _print_report(report)
    freeze_long_lived_objects()  # the API process's own start-up objects (FastAPI, pydantic, tokenizer)

    def listening() -> None:
        key = "" if server_config.api_key is None else "  (API key required)"
        print(f"  {'listening':<18} {socket_url(sock)}{key}", flush=True)
        if not server_config.is_loopback:
            print(f"  warning: listening on {server_config.host}, not loopback; set --api-key", file=sys.stderr)

    # log_config=None: uvicorn's loggers propagate to ours (one format, timestamps).
    config = uvicorn_config(app, server_config, log_level=args.log_level, log_config=None)
    server = HTTPServer(config, engine_loop=app.state.server.engine_loop, grace_s=server_config.shutdown_timeout_s,
                        on_listening=listening)
    # uvicorn handles SIGINT and SIGTERM alike (drain, grace period), then restores the previous
    # handlers and re-raises the signal: Python's default SIGTERM would then kill the process
    # (exit -15) after the clean shutdown, so SIGTERM raises KeyboardInterrupt as SIGINT does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # the signal uvicorn handled, re-raised after a clean shutdown
        return 0
    return 0 if server.started else 1


def chat(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.url is not None:
        if args.chat_template_file:
            print("compiled-serve: error: --chat-template applies to the in-process chat; with --url the "
                  "server applies its own", file=sys.stderr)
            return 2
        from compiled_serve.chat_client import run_remote_chat

        return run_remote_chat(args.url, sys.stdin, sys.stdout, sys.stderr, model=args.model,
                               api_key=args.api_key, max_tokens=args.max_tokens, temperature=args.temperature,
                               system=args.system, interactive=sys.stdin.isatty())
    from compiled_serve.chat_repl import run_chat
    from compiled_serve.sampling_params import SamplingParams
    from compiled_serve.startup import start_engine

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    template = Path(args.chat_template_file).read_text() if args.chat_template_file else None
    engine = start_engine(_engine_config(args))
    return run_chat(engine, params, sys.stdin, sys.stdout, system=args.system, template=template,
                    interactive=sys.stdin.isatty())


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return serve(args)
    if args.command == "chat":
        return chat(args)
    if args.command == "compile":
        from compiled_serve.build.command import run_compile

        return run_compile(args)
    if args.command == "bench":
        from compiled_serve.bench.cli import run_bench

        return run_bench(args)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    from compiled_serve.logging_setup import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", "info"))
    try:
        code = _run(args)
    except CompiledServeError as exc:
        print(f"compiled-serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compiled-serve: interrupted", file=sys.stderr)
        return 130
    if argv is None and args.command == "serve":
        _exit_skipping_teardown(code)
    return code


def _exit_skipping_teardown(code: int) -> None:
    """A server that stopped cleanly has nothing left to finalize, but the interpreter's teardown of
    torch and the model's tensors takes seconds on a small machine; exit without it, so a stop
    takes the grace period and no more. Only for the real command line (argv None), never in-process."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
