"""compiled_serve: an LLM inference and serving engine whose core is a graph compiler."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "EngineConfig", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import compiled_serve` stays cheap
    if name == "LLM":
        from compiled_serve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from compiled_serve.sampling_params import SamplingParams

        return SamplingParams
    if name == "EngineConfig":
        from compiled_serve.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
