"""Which quantization a model is served with (`--quantization`), and loading it that way.

Names follow vLLM where vLLM has the method; "int8" and "int4" are ours (vLLM has no plain
weight-only CPU method), and so is "none" (vLLM has no way to ask for a GGUF dequantized):

  "auto"/None  a GGUF on the CPU whose linear weights are Q4_0/Q4_1/Q8_0: "gguf"; anything else: "none"
  "none"       every weight dequantized to --dtype (the fp32 reference on the CPU)
  "gguf"       a GGUF's own blocks kept as they are: Q4_0/Q4_1 -> the int4 layout, Q8_0 -> q8b (CPU)
  "int8"       per-channel int8 weights, quantized at load from the float values (CPU)
  "int4"       int4 groups of 32 (a Q4 GGUF repacks code for code; others quantize at load) (CPU)
  "fp8"        e4m3 weights with per-channel scales, quantized at load from bf16 (CUDA)

Quantized layers keep plain `nn.Linear` modules with placeholder weights (models/quantized.py);
QuantizedLinearPass (QUANTIZED_LINEAR_PASS) rewrites them, and the engine adds it whenever the
method is not "none". The int4/int8 kernels compute in bf16 (their fp32 paths are scalar loops),
whatever --dtype says; --dtype is the dtype of everything else (norms, attention, the KV cache).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

from compiled_serve.errors import InvalidParameterError
from compiled_serve.models.loaders.base import LoadedModel

QUANTIZATIONS = ("none", "gguf", "int8", "int4", "fp8")
QUANTIZED_LINEAR_PASS = "compiled_serve.passes.quantized_linear:QuantizedLinearPass"
_CPU_ONLY = ("gguf", "int8", "int4")
# GGUF block type of a file's linear weights -> the layout that keeps its codes.
GGUF_LAYOUTS = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "q8b"}


def _gguf_path(model: str | None, load_format: str) -> str | None:
    from compiled_serve.models.default_model import default_model_path

    if load_format == "dummy":
        return None
    path = default_model_path() if model is None else model
    if load_format == "gguf" or (load_format == "auto" and path.lower().endswith(".gguf")):
        return path
    return None


def gguf_layout(path: str) -> str | None:
    """The layout that keeps this GGUF's linear weights as they are, or None (e.g. K-quants)."""
    from collections import Counter

    from compiled_serve.models.loaders.gguf_file import open_gguf

    linear = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.")
    types = Counter(t.tensor_type.name for t in open_gguf(path).tensors if any(k in t.name for k in linear))
    layouts = {GGUF_LAYOUTS.get(name) for name in types}
    return layouts.pop() if len(layouts) == 1 else None


def resolve_quantization(requested: str | None, model: str | None, load_format: str, device: torch.device) -> str:
    """The method a config asks for, with None resolved; a combination that cannot run is refused."""
    path = _gguf_path(model, load_format)
    if requested in (None, "auto"):
        # A missing file resolves to "none", so the loader refuses it with its own typed error.
        if device.type == "cpu" and path is not None and os.path.isfile(path) and gguf_layout(path) is not None:
            return "gguf"
        return "none"
    if requested not in QUANTIZATIONS:
        raise InvalidParameterError("quantization", f"must be one of {QUANTIZATIONS} or none (auto), got {requested!r}")
    if requested == "fp8" and device.type != "cuda":
        raise InvalidParameterError("quantization", "fp8 needs a CUDA device (torch._scaled_mm); on the CPU "
                                    "use gguf, int8 or int4")
    if requested in _CPU_ONLY and device.type != "cpu":
        raise InvalidParameterError("quantization", f"{requested} runs on the CPU only; on CUDA use fp8 or none")
    if requested == "gguf":
        if path is None:
            raise InvalidParameterError("quantization", "gguf needs a .gguf model")
        if gguf_layout(path) is None:
            raise InvalidParameterError("quantization", f"{path}: its linear weights are not all Q4_0/Q4_1/Q8_0 "
                                        "(K-quants are not kept quantized yet); use none, int8 or int4")
    return requested


def load_quantized_model(model: str | None, quantization: str, *, load_format: str, dtype: torch.dtype,
                         device: torch.device, tokenizer: str | None = None, **load_kwargs: Any) -> LoadedModel:
    """`load_model`, with the linear weights in the layout `quantization` (resolved) asks for.

    A GGUF goes through `load_gguf_quantized` (blocks repacked or quantized one tensor at a
    time: no float copy of the whole model); any other model loads in `dtype` and is then
    quantized layer by layer.
    """
    from compiled_serve.models.loader import load_model

    if quantization == "none":
        return load_model(model, load_format=load_format, dtype=dtype, device=device, tokenizer=tokenizer,
                          **load_kwargs)
    path = _gguf_path(model, load_format)
    if path is not None and quantization in _CPU_ONLY:
        from compiled_serve.models.loaders.gguf_quantized import load_gguf_quantized
        from compiled_serve.models.loaders.tokenizer_override import load_tokenizer, with_tokenizer

        layout = gguf_layout(path) if quantization == "gguf" else quantization
        override = None if tokenizer is None else load_tokenizer(tokenizer)
        loaded = load_gguf_quantized(path, layout, dtype=dtype)
        release_freed_memory()
        return loaded if tokenizer is None else with_tokenizer(loaded, override, tokenizer)
    from compiled_serve.models.quantized import quantize_linear_layers

    loaded = load_model(model, load_format=load_format, dtype=dtype, device=device, tokenizer=tokenizer,
                        **load_kwargs)
    layout = quantization  # int8, int4 or fp8: the layout of the same name
    quantize_linear_layers(loaded.module, layout)
    release_freed_memory()
    tag = hashlib.sha256(f"{loaded.weight_fingerprint}:quantized:{layout}".encode()).hexdigest()
    return loaded._replace(weight_fingerprint=tag, source=f"{loaded.source}, linear weights as {layout}")


def release_freed_memory() -> None:
    """Hands the heap that loading freed back to the OS (glibc keeps it: the per-tensor dequantize
    and repack buffers left ~140 MB resident after loading the embedded model, measured)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
