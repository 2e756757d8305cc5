"""One workload, end to end: draw its requests, measure the ceilings, compute the floor on those
exact requests, run the engine, and build the record."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from compiled_serve.bench.ceilings import measure_ceilings
from compiled_serve.bench.defaults import SERVER_START_TIMEOUT_S, TEMPERATURE
from compiled_serve.bench.floor import model_cost, workload_floor
from compiled_serve.bench.record import build_record, environment, headline, serve_floors
from compiled_serve.bench.workloads import Workload, draw_requests
from compiled_serve.engine.device import resolve_device, resolve_dtype
from compiled_serve.models.loaders.dummy import dummy_config
from compiled_serve.models.quantization import resolve_quantization


def run_workload(workload: Workload, settings: dict[str, Any], *, repeats: int = 1,
                 rates: list[float] | None = None, url: str | None = None) -> dict[str, Any]:
    config, _ = dummy_config(workload.model)
    device = resolve_device(settings["device"])
    dtype = resolve_dtype(settings["dtype"], device)
    requests = draw_requests(workload, config.vocab_size)
    ceilings = measure_ceilings(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the engine sizes its KV cache from free memory
    # The floor of the method the engine will run: auto resolves ("none" for these dummy weights).
    cost = model_cost(config, dtype, resolve_quantization(settings.get("quantization"), workload.model, "dummy",
                                                          device), settings.get("kv_cache_dtype"))
    floor = workload_floor(cost, requests.prompt_lens, requests.output_lens, ceilings.ceilings)
    env = environment(device)
    summary = None
    if workload.command == "serve":
        from compiled_serve.bench.serve import run_serve, running_server, wait_healthy

        if url is not None:
            wait_healthy(url, SERVER_START_TIMEOUT_S)
            rows, startup, settings = run_serve(url, requests, rates or []), None, {"url": url}
        else:
            # Every rate sends the same requests: with prefix caching on, the rates after the first
            # would find their prompts cached (TTFT below the prefill floor, as a first H200 run
            # showed). The random token-id prompts share no prefix, so off changes nothing else.
            settings = {**settings, "enable_prefix_caching": False}
            with running_server(workload.model, settings, SERVER_START_TIMEOUT_S) as (base, startup):
                rows = run_serve(base, requests, rates or [])
        prompt_len, output_len = statistics.mean(requests.prompt_lens), statistics.mean(requests.output_lens)
        for row in rows:
            row.update(serve_floors(row, cost, prompt_len, output_len, ceilings))
        result: dict[str, Any] = {"startup_s": startup, "rates": rows}
    else:
        from compiled_serve.bench.offline import start_llm

        llm, startup = start_llm(workload.model, settings)
        if workload.command == "throughput":
            from compiled_serve.bench.throughput import run_throughput

            result = {"startup_s": startup, **run_throughput(llm, requests)}
            summary = headline(workload, result["out_tok_s"], floor, env["gpu"])
        else:
            from compiled_serve.bench.latency import run_latency

            result = {"startup_s": startup, **run_latency(llm, requests, repeats)}
            summary = headline(workload, result["decode_tok_s"], floor, env["gpu"])
        result["engine_report"] = {k: str(v) for k, v in llm.llm_engine.startup_report().items()}
    sampling = {"temperature": TEMPERATURE, "seed": "the request's index", "ignore_eos": True}
    return build_record(workload, env, {**settings, "sampling": sampling}, ceilings, cost, floor, result, summary)
