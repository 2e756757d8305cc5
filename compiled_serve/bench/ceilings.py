"""The two ceilings the floor divides by, measured on this machine in every run (PERF.md).

CUDA: a 1 GiB device-to-device copy (bytes read plus written) and a bf16 8192^3 matmul, each
timed with CUDA events, median of repeats. CPU: the same two measurements, smaller (a 64 MiB
copy, an fp32 1024^3 matmul) and timed with the wall clock; the result says which it was.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compiled_serve.bench.floor import Ceilings

_REPEATS = {"cuda": 10, "cpu": 5}


@dataclass(frozen=True)
class MeasuredCeilings:
    ceilings: Ceilings
    method: str  # what was measured, for the record

    def to_dict(self) -> dict[str, float | str]:
        return {"copy_gb_s": self.ceilings.copy_bytes_per_s / 1e9,
                "matmul_tflop_s": self.ceilings.matmul_flop_per_s / 1e12, "method": self.method}


def measure_ceilings(device: torch.device) -> MeasuredCeilings:
    if device.type == "cuda":
        copy_bytes, matmul_n, dtype, clock = 1 << 30, 8192, torch.bfloat16, _cuda_seconds
    else:
        copy_bytes, matmul_n, dtype, clock = 64 << 20, 1024, torch.float32, _wall_seconds
    repeats = _REPEATS[device.type]
    copy_s = _copy_seconds(copy_bytes, device, lambda fn: clock(fn, repeats))
    matmul_s = _matmul_seconds(matmul_n, dtype, device, lambda fn: clock(fn, repeats))
    dtype_name = str(dtype).removeprefix("torch.")
    method = (f"{device.type}: {copy_bytes >> 20} MiB copy (read + write), {dtype_name} {matmul_n}^3 matmul, "
              f"median of {repeats}")
    return MeasuredCeilings(Ceilings(copy_bytes_per_s=2 * copy_bytes / copy_s,
                                     matmul_flop_per_s=2 * matmul_n**3 / matmul_s), method)


def _copy_seconds(nbytes: int, device: torch.device, clock: Callable[[Callable[[], object]], float]) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return clock(lambda: dst.copy_(src))


def _matmul_seconds(n: int, dtype: torch.dtype, device: torch.device,
                    clock: Callable[[Callable[[], object]], float]) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return clock(lambda: torch.mm(a, b))


def _cuda_seconds(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _wall_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
