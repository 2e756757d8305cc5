"""A Hugging Face model directory: config.json + safetensors (one file or sharded with an index).

Tensors stream one at a time from `safe_open` into the model built on the meta device, so a
checkpoint is never held twice in memory. Remote code is never trusted.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from typing import Any

from safetensors import safe_open

from compiled_serve.errors import ModelLoadError
from compiled_serve.models.config import ModelConfig
from compiled_serve.models.loaders.base import (
    LoadedModel,
    LoadRequest,
    WeightFormat,
    build_empty_module,
    file_fingerprint,
    register_format,
    require_existing,
)

_INDEX = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def safetensors_files(directory: str) -> list[str]:
    """The weight files of `directory` ([] if none); a sharded index must name existing files."""
    index = os.path.join(directory, _INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(directory, s) for s in shards]
        missing = [s for s, path in zip(shards, files) if not os.path.isfile(path)]
        if missing:
            raise ModelLoadError(f"{directory}: {_INDEX} names shard(s) that are not there: {missing[:5]}")
        return files
    return sorted(glob.glob(os.path.join(directory, "*.safetensors")))


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def read_model_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{directory} has no config.json")
    raw = read_json(path)
    # Instruct models often list extra stop ids (e.g. Llama 3's <|eot_id|>) only here.
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen_path):
        extra = read_json(gen_path).get("eos_token_id")
        ids = [raw.get("eos_token_id"), extra]
        merged = [i for v in ids if v is not None for i in (v if isinstance(v, list) else [v])]
        raw = {**raw, "eos_token_id": list(dict.fromkeys(merged))}
    return ModelConfig.from_hf(raw)


def iter_safetensors(files: list[str], lazy: bool = False) -> Iterator[tuple[str, Any]]:
    """(name, tensor) pairs; `lazy`: (name, slice) pairs that read only what is indexed (a
    tensor-parallel rank reads its rows/columns, never the whole tensor)."""
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_slice(name) if lazy else f.get_tensor(name)


def load_hf_tokenizer(directory: str) -> Any:
    if not any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds; the user needs the path and cause
        raise ModelLoadError(f"cannot load the tokenizer in {directory}: {e}") from e


def load_safetensors_dir(request: LoadRequest, source_prefix: str = "safetensors") -> LoadedModel:
    directory = request.model
    require_existing(directory)
    if not os.path.isdir(directory):
        raise ModelLoadError(f"{directory} is not a directory (expected config.json + *.safetensors)")
    files = safetensors_files(directory)
    if not files:
        found = sorted(os.listdir(directory))[:10]
        raise ModelLoadError(
            f"{directory} has no *.safetensors weights (found: {found}); supported formats are "
            "safetensors directories and .gguf files"
        )
    config = read_model_config(directory)
    module = build_empty_module(config, request.dtype, request.device, tp=request.tp)
    module.load_weights(iter_safetensors(files, lazy=request.tp[1] > 1))
    tokenizer = load_hf_tokenizer(directory)
    json_files = [os.path.join(directory, n) for n in ("config.json", _INDEX) if os.path.isfile(os.path.join(directory, n))]
    return LoadedModel(
        module=module,
        config=config,
        tokenizer=tokenizer,
        chat_template=getattr(tokenizer, "chat_template", None),
        source=f"{source_prefix}:{directory} ({len(files)} file(s))",
        weight_fingerprint=file_fingerprint(files + json_files),
    )


@register_format
class SafetensorsFormat(WeightFormat):
    name = "safetensors"
    auto_priority = 20

    def claims(self, model: str) -> bool:
        return os.path.isdir(model)

    def load(self, request: LoadRequest) -> LoadedModel:
        return load_safetensors_dir(request)
