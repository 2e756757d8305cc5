"""Architecture name (as in HF `config.architectures`) -> model class.

Built-in models are imported lazily on first use; a user's own model plugs in with
`@register_model("MyForCausalLM")` once its module is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TypeVar

from torch import nn

from compiled_serve.errors import ModelLoadError

_REGISTRY: dict[str, type[nn.Module]] = {}
_BUILTIN: dict[str, str] = {
    "LlamaForCausalLM": "compiled_serve.models.llama",
    "MistralForCausalLM": "compiled_serve.models.llama",
    "Qwen2ForCausalLM": "compiled_serve.models.qwen2",
    "Qwen3ForCausalLM": "compiled_serve.models.qwen3",
}

M = TypeVar("M", bound=type[nn.Module])


def register_model(*architectures: str) -> Callable[[M], M]:
    def decorate(cls: M) -> M:
        for arch in architectures:
            _REGISTRY[arch] = cls
        return cls

    return decorate


def supported_architectures() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def resolve_model_class(architectures: Sequence[str]) -> type[nn.Module]:
    for arch in architectures:
        if arch not in _REGISTRY and arch in _BUILTIN:
            importlib.import_module(_BUILTIN[arch])  # registers through the decorator
        if arch in _REGISTRY:
            return _REGISTRY[arch]
    raise ModelLoadError(
        f"unsupported model architecture {list(architectures)}; supported: "
        f"{', '.join(supported_architectures())}"
    )
