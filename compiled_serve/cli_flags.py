"""Command-line flags made from config fields: what each means, its choices, and what None means.

The defaults come from the dataclass fields (written once, in compiled_serve/config.py and
compiled_serve/server/config.py); this module adds only the words. Light on purpose: `--help`
must not import torch or FastAPI.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from compiled_serve import config as engine_config
from compiled_serve.server.reasoning import REASONING_PARSERS
from compiled_serve.server.tool_parsers import TOOL_PARSERS

# Fields whose values are a closed set: argparse checks them and `--help` lists them.
CHOICES: dict[str, Sequence[str]] = {
    "dtype": engine_config._DTYPES, "load_format": engine_config._LOAD_FORMATS,
    "quantization": engine_config._QUANTIZATIONS, "kv_cache_dtype": engine_config._KV_CACHE_DTYPES,
    "device": engine_config._DEVICES, "compile_mode": engine_config._COMPILE_MODES,
    "build_fallback": engine_config._BUILD_FALLBACKS, "scheduling": engine_config._SCHEDULING,
    "structured_outputs_backend": engine_config._STRUCTURED_OUTPUTS_BACKENDS,
    "tool_call_parser": sorted(TOOL_PARSERS), "reasoning_parser": sorted(REASONING_PARSERS),
}

MODEL_HELP = ("a .gguf file, a Hugging Face model directory (config.json + *.safetensors), a hub id "
              "(org/name), or with --load-format dummy a preset name; none: the embedded SmolLM2-135M-Instruct")

HELP: dict[str, str] = {
    "model": MODEL_HELP,
    "load_format": "how to read --model; auto: from its path (.gguf, a directory, a hub id); "
                   "dummy: random weights for a preset, config.json or directory",
    "dtype": "weight and activation dtype; auto: float32 on CPU, bfloat16 on CUDA",
    "quantization": "weight quantization; auto: a GGUF on the CPU keeps its own blocks (gguf), anything else none; "
                    "gguf: Q4_0/Q4_1 as int4, Q8_0 as int8 blocks (CPU); int8, int4: weight-only, quantized at "
                    "load (CPU); fp8: e4m3 weights with per-channel scales (CUDA); none: unquantized, in --dtype",
    "kv_cache_dtype": "KV-cache dtype; auto: the model's --dtype; fp8 (fp8_e4m3): e4m3 with scales of 1.0, half "
                      "the bytes of bf16 per token (CUDA only)",
    "device": "auto: cuda when available, else cpu",
    "seed": "seed of the dummy weights",
    "tokenizer": "a tokenizer directory or hub id used instead of the model's own; none: the model's own",
    "block_size": "KV-cache block size in tokens (8, 16, 32, 64 or 128)",
    "gpu_memory_utilization": "fraction of the GPU's memory the engine may use, in (0, 1] (CUDA only)",
    "cpu_kv_cache_gib": "KV-cache size in GiB on CPU",
    "num_kv_blocks": "KV-cache blocks, overriding the size derived from memory; none: derived from memory",
    "max_num_seqs": "most sequences in one step (also the largest CUDA-graph decode bucket)",
    "max_num_batched_tokens": "token budget of one step: prefill chunks plus decodes",
    "max_model_len": "longest prompt plus output, in tokens; none: the model's context length "
                     "(capped by what the KV cache holds)",
    "tensor_parallel_size": "ranks the model is sharded over (one process each; gloo on CPU, NCCL on CUDA, on "
                            "loopback): heads and sizes must divide by it",
    "distributed_executor_backend": "uni: the model runs in the engine's process (TP=1 only); mp: through the "
                                    "tensor-parallel worker path, at TP=1 too; none: uni at TP=1, mp above",
    "distributed_interface": "network interface the tensor-parallel ranks' sockets bind to; lo: loopback, this "
                             "machine only. The traffic is unauthenticated: name another only on a private network "
                             "(every rank still runs on this machine)",
    "max_logprobs": "largest logprobs / top_logprobs a request may ask for",
    "max_n": "largest n (samples per prompt) a request may ask for",
    "compile_mode": "inductor: compile the rewritten graph (slow start, fast steps); graph: run it as "
                    "captured (fast start, for tests and debugging)",
    "build_dir": "directory of builds from `compiled-serve compile`; a matching build is loaded instead of "
                 "compiling; none: compile at start-up",
    "build_fallback": "when --build-dir holds no matching build: refuse (an error naming what differs) or "
                      "compile (and use the directory as a cache)",
    "build_cache_gib": "bound of the build cache in GiB; beyond it the least recently used builds are removed",
    "scheduling": "async: launch step N+1 while step N runs; sync: one step at a time; legacy: the old path",
    "structured_outputs_backend": "grammar library of response_format, structured_outputs and forced tool calls; "
                                  "auto, guidance, llguidance: llguidance; xgrammar: the optional extra "
                                  "(pip install 'compiled-serve[xgrammar]')",
    "host": "address to listen on; 127.0.0.1: this machine only; 0.0.0.0: every interface (set --api-key)",
    "port": "TCP port to listen on; 0: any free port",
    "api_key": "require 'Authorization: Bearer KEY' on every endpoint but /health; "
               "none: $COMPILED_SERVE_API_KEY, or no key",
    "max_waiting_requests": "requests admitted but not yet running; beyond this a 503 with Retry-After",
    "retry_after_s": "seconds the Retry-After header of a 503 asks clients to wait",
    "max_request_body_bytes": "largest request body; beyond it a 413",
    "max_header_count": "most request headers; beyond it a 431",
    "max_header_bytes": "largest single header line (name + value); beyond it a 431",
    "max_total_header_bytes": "largest header block in all; beyond it a 431",
    "chat_template_file": "a Jinja chat-template file used instead of the model's own; none: the model's own",
    "tool_call_parser": "how tool calls are read from the model's text (tool_choice auto); hermes: "
                        "<tool_call>{json}</tool_call>; llama3_json: a bare JSON call; mistral: [TOOL_CALLS][...]",
    "reasoning_parser": "split <think>...</think> reasoning into reasoning_content; deepseek_r1: up to </think> "
                        "is reasoning; qwen3: only after an opening <think>; none: no split",
    "log_stats_interval_s": "seconds between engine lines (prompt and generation tok/s, running and waiting "
                            "requests, KV-cache use, prefix-cache hits) while there is work; 0: none",
    "shutdown_timeout_s": "on SIGINT or SIGTERM, seconds in-flight requests get to finish before they are "
                          "aborted (streams then end with an error event and [DONE])",
}

RENAMED = {"chat_template_file": "--chat-template", "log_stats_interval_s": "--log-stats-interval"}
ALIASES = {"shutdown_timeout_s": ("--shutdown-timeout",),
           # vLLM's current spelling, and its older one.
           "structured_outputs_backend": ("--structured-outputs-config.backend", "--guided-decoding-backend")}


def flag(name: str) -> str:
    return RENAMED.get(name, "--" + name.replace("_", "-"))


def flag_help(name: str, default: object) -> str:
    shown = "none" if default is None else default
    return f"{HELP[name]} (default: {shown})"


def add_fields(parser: argparse.ArgumentParser, flags: dict[str, type], defaults: dict[str, object]) -> None:
    """One flag per config field: its type, default, choices and help."""
    for name, kind in flags.items():
        default = defaults[name]
        parser.add_argument(flag(name), *ALIASES.get(name, ()), dest=name, type=kind, default=default,
                            choices=CHOICES.get(name), help=flag_help(name, default) if name != "api_key"
                            else f"{HELP[name]} (default: none)")


class _PositionalModel(argparse.Action):
    """`serve MODEL` as well as `serve --model MODEL`; both at once must agree."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given = getattr(namespace, "model", None)
        if given is not None and given != values:
            parser.error(f"the model is given twice: {values!r} and --model {given!r}")
        namespace.model = values


def add_positional_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("positional_model", nargs="?", metavar="MODEL", action=_PositionalModel,
                        default=argparse.SUPPRESS, help=f"the model (or --model): {MODEL_HELP}")
