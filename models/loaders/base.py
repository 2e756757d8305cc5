"""What every weight format shares: the `LoadedModel` result, the format registry, and building a
model on the meta device so that weights are materialized once, directly on the target device.

A format is a `WeightFormat` subclass registered with `@register_format`; `load_model` picks one
by name or, for "auto", asks each in turn whether it `claims` the model string.
"""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from compiled_serve.errors import ModelLoadError
from compiled_serve.models.base import CausalLM
from compiled_serve.models.config import ModelConfig
from compiled_serve.models.registry import resolve_model_class


class LoadedModel(NamedTuple):
    module: CausalLM  # eval mode, on the requested device and dtype, requires_grad off
    config: ModelConfig
    tokenizer: Any  # transformers PreTrainedTokenizerFast, or None (dummy weights without one)
    chat_template: str | None
    source: str  # for humans: "gguf:/path (Q4_1, dequantized)", "safetensors:/dir", ...
    weight_fingerprint: str  # cheap, stable sha256 hex; part of the compiled-artifact key


@dataclass(frozen=True)
class LoadRequest:
    model: str
    dtype: torch.dtype
    device: torch.device
    seed: int = 0
    tp: tuple[int, int] = (0, 1)  # (rank, tensor_parallel_size): load only this rank's shards


class WeightFormat(abc.ABC):
    name: ClassVar[str]
    # Lower goes first when load_format="auto" asks each format whether it claims a model string.
    auto_priority: ClassVar[int] = 100

    @abc.abstractmethod
    def claims(self, model: str) -> bool:
        """Whether load_format="auto" should use this format for `model`."""

    @abc.abstractmethod
    def load(self, request: LoadRequest) -> LoadedModel: ...


_FORMATS: dict[str, WeightFormat] = {}


def register_format(cls: type[WeightFormat]) -> type[WeightFormat]:
    _FORMATS[cls.name] = cls()
    return cls


def registered_formats() -> dict[str, WeightFormat]:
    return dict(_FORMATS)


def build_empty_module(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                       tp: tuple[int, int] = (0, 1)) -> CausalLM:
    """The model in inference mode with uninitialized storage on `device`, to be filled by
    `load_weights` (or dummy init): weights are materialized once, where they will live.
    `tp` = (rank, size) with size > 1: only that rank's shards are allocated (models/tp_weights.py)."""
    if tp[1] > 1:
        from compiled_serve.models.tp_weights import build_tp_module

        return build_tp_module(config, dtype, device, *tp)  # type: ignore[return-value]
    cls = resolve_model_class([config.architecture])
    with torch.device("meta"):
        module = cls(config)
    module.to(dtype=dtype)  # on meta: free
    module.to_empty(device=device)
    return module.eval().requires_grad_(False)


def file_fingerprint(paths: Iterable[str], extra: str = "") -> str:
    """sha256 over names, sizes, mtimes and resolved link targets (hub blobs are named by hash)."""
    h = hashlib.sha256(extra.encode())
    for path in sorted(paths):
        st = os.stat(path)
        target = os.path.basename(os.path.realpath(path))
        h.update(f"{os.path.basename(path)}|{st.st_size}|{st.st_mtime_ns}|{target}\n".encode())
    return h.hexdigest()


def require_existing(path: str) -> None:
    if not os.path.exists(path):
        raise ModelLoadError(f"model path {path!r} does not exist")
