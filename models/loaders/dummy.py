"""Random weights for a preset name, a config.json, or a Hugging Face model directory.

For benchmarks and tests at real shapes without checkpoints. Weights are drawn directly on the
target device (an 8B model never round-trips through host memory), deterministic per (seed,
parameter name): std 0.02 for matrices, ones for RMSNorm weights, zeros for biases.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from compiled_serve.errors import ModelLoadError
from compiled_serve.models.base import CausalLM
from compiled_serve.models.config import ModelConfig
from compiled_serve.models.layers import PackedLinear, RMSNorm
from compiled_serve.models.loaders.base import (
    LoadedModel,
    LoadRequest,
    WeightFormat,
    build_empty_module,
    register_format,
)
from compiled_serve.models.loaders.safetensors_dir import load_hf_tokenizer, read_json, read_model_config
from compiled_serve.models.presets import PRESETS, preset_config

INIT_STD = 0.02


def dummy_config(model: str) -> tuple[ModelConfig, str | None]:
    """(config, directory to take a tokenizer from or None)."""
    if model in PRESETS:
        return preset_config(model), None
    if os.path.isdir(model):
        return read_model_config(model), model
    if os.path.isfile(model) and model.endswith(".json"):
        return ModelConfig.from_hf(read_json(model)), None
    raise ModelLoadError(
        f"dummy weights need a preset ({', '.join(sorted(PRESETS))}), a config.json or a model "
        f"directory; got {model!r}"
    )


def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_dummy_weights(module: CausalLM, seed: int) -> None:
    norms = {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, RMSNorm)}
    for name, param in module.named_parameters():
        tp_loader = getattr(param, "tp_weight_loader", None)
        if tp_loader is not None:  # a tensor-parallel shard: this rank's slice of the TP=1 values
            full = torch.zeros(param.shape, dtype=param.dtype, device=param.device)  # drawn whole, once
            if not name.endswith(".bias"):
                generator = torch.Generator(device=param.device).manual_seed(_param_seed(seed, name))
                full.normal_(0.0, INIT_STD, generator=generator)
            for shard_id in _shard_ids(module, name):
                tp_loader(_section(module, name, shard_id, full), shard_id)
        elif name in norms:
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        elif param.device.type != "meta":
            generator = torch.Generator(device=param.device).manual_seed(_param_seed(seed, name))
            param.normal_(0.0, INIT_STD, generator=generator)  # in place: no extra copy


def _shard_ids(module: CausalLM, name: str) -> list:
    owner = module.get_submodule(name.rpartition(".")[0])
    return list(owner.shard_offsets) if isinstance(owner, PackedLinear) else [None]


def _section(module: CausalLM, name: str, shard_id: object, full: torch.Tensor) -> torch.Tensor:
    """The checkpoint tensor of a packed section (q, k, v / gate, up) within a full packed weight."""
    if shard_id is None:
        return full
    start, size = module.get_submodule(name.rpartition(".")[0]).shard_offsets[shard_id]
    return full.narrow(0, start, size)


def dummy_fingerprint(config: ModelConfig, seed: int) -> str:
    blob = json.dumps({"config": config.to_dict(), "seed": seed, "std": INIT_STD}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@register_format
class DummyFormat(WeightFormat):
    name = "dummy"
    auto_priority = 1000  # never chosen by "auto"

    def claims(self, model: str) -> bool:
        return False

    def load(self, request: LoadRequest) -> LoadedModel:
        config, tokenizer_dir = dummy_config(request.model)
        module = build_empty_module(config, request.dtype, request.device, tp=request.tp)
        init_dummy_weights(module, request.seed)
        tokenizer = load_hf_tokenizer(tokenizer_dir) if tokenizer_dir else None
        return LoadedModel(
            module=module,
            config=config,
            tokenizer=tokenizer,
            chat_template=getattr(tokenizer, "chat_template", None),
            source=f"dummy:{request.model} (random weights, seed {request.seed})",
            weight_fingerprint=dummy_fingerprint(config, request.seed),
        )
