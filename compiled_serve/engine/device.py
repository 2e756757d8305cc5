"""Picking the device and dtype a config asks for."""

from __future__ import annotations

import torch

from compiled_serve.errors import InvalidParameterError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError("device", "CUDA was asked for but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def resolve_kv_cache_dtype(config: object, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype: the model's (auto), or e4m3 (fp8, fp8_e4m3) where the kernels write
    and read it: one CUDA device of compute capability 8.9 or newer (Triton's e4m3)."""
    name = getattr(config, "kv_cache_dtype", "auto")
    if name == "auto":
        return dtype
    if device.type != "cuda":
        raise InvalidParameterError("kv_cache_dtype", f"{name} needs a CUDA device (the Triton paged-attention "
                                    "kernels); on the CPU use auto")
    if torch.cuda.get_device_capability(device) < (8, 9):
        raise InvalidParameterError("kv_cache_dtype", f"{name} needs compute capability 8.9 or newer (e4m3)")
    if getattr(config, "tensor_parallel_size", 1) > 1 or getattr(config, "distributed_executor_backend", None) == "mp":
        raise InvalidParameterError("kv_cache_dtype", f"{name} is not supported with tensor parallelism yet")
    return torch.float8_e4m3fn
