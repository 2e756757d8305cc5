"""One bench run as a JSON record: the hardware, date, software, settings, ceilings, the floor on
the exact requests sent, the result, and the comparison with vLLM's recorded figure."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import sys
from typing import Any

import torch

from compiled_serve.bench.ceilings import MeasuredCeilings
from compiled_serve.bench.floor import Floor, ModelCost
from compiled_serve.bench.workloads import VLLM_GPU, VLLM_H200, Workload

TOOL = "compiled-serve bench"
SCHEMA_VERSION = 1


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "hardware": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()}, "
                    f"{torch.get_num_threads()} threads)",
        "versions": {"compiled_serve": _version("compiled-serve"), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "triton": _version("triton"),
                     "transformers": _version("transformers"), "python": platform.python_version()},
        "command_line": sys.argv,
    }


def headline(workload: Workload, value: float, floor: Floor, gpu: str | None) -> dict[str, Any]:
    """The one figure of an offline run against its floor and vLLM's recorded figure."""
    decode = workload.command == "latency"
    floor_value = 1.0 / floor.decode_step_s if decode else floor.out_tok_s
    peer = None if workload.modified else VLLM_H200.get(workload.id)
    return {
        "metric": "decode tok/s" if decode else "out tok/s", "value": value, "floor": floor_value,
        "pct_of_floor": 100.0 * value / floor_value,
        "vllm": None if peer is None else {
            "value": peer.value, "source": peer.source, "ratio": value / peer.value,
            # vLLM's figure is an H200 one: the ratio means little on another GPU.
            "same_gpu": gpu is not None and VLLM_GPU in gpu,
        },
    }


def serve_floors(row: dict[str, Any], cost: ModelCost, prompt_len: int, output_len: int,
                 ceilings: MeasuredCeilings) -> dict[str, float]:
    """W4's targets: TTFT against one prompt's prefill floor; TPOT against the decode step of the
    running batch (the mean concurrency, each request at its mean context)."""
    c = ceilings.ceilings
    prefill_s = 2 * cost.params * prompt_len / c.matmul_flop_per_s
    batch = max(row["mean_concurrency"], 1.0)
    step_bytes = cost.weight_bytes + batch * (prompt_len + output_len / 2) * cost.kv_bytes_per_token
    return {"prefill_floor_ms": 1e3 * prefill_s, "decode_step_floor_ms": 1e3 * step_bytes / c.copy_bytes_per_s}


def build_record(workload: Workload, env: dict[str, Any], settings: dict[str, Any], ceilings: MeasuredCeilings,
                 cost: ModelCost, floor: Floor, result: dict[str, Any],
                 summary: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "tool": TOOL, "schema": SCHEMA_VERSION, "engine": "compiled_serve", **env,
        "workload": {"id": workload.id, "command": workload.command, "model": workload.model,
                     "num_requests": workload.num_requests, "prompt_len": list(workload.prompt_len),
                     "output_len": list(workload.output_len), "modified": workload.modified,
                     "description": workload.describe()},
        "settings": settings, "ceilings": ceilings.to_dict(),
        "model_cost": {"params": cost.params, "weight_bytes": cost.weight_bytes,
                       "kv_bytes_per_token": cost.kv_bytes_per_token},
        "floor": floor.to_dict(), "result": result, "headline": summary,
    }
