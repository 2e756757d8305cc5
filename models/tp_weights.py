"""One tensor-parallel rank's weights: only its shards are allocated and only its shards are read.

The module is still the whole model (the graph is captured at full size and TensorParallelPass
shards it), but each sharded parameter is a memory-less full-shape placeholder (a zero-strided
view of one zero) carrying `tp_shard`, the rank's slice, and `tp_weight_loader`, which copies the
rank's rows or columns of one checkpoint tensor into it. `load_hf_weights` calls that loader;
given a lazy safetensors slice it reads only those rows/columns from the file.

Which parameters are sharded, and how (the slices come from models/tp_layout.py, as the pass's):
  QKVLinear weight/bias       rows, per q/k/v section (heads; KV heads replicated if fewer than ranks)
  GateUpLinear weight         rows, per gate/up section
  o_proj / down_proj weight   columns (their input dim)
  VocabEmbedding, lm_head     rows (the vocabulary)
Norms and everything else are replicated: every rank holds them whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compiled_serve.models.config import ModelConfig
from compiled_serve.models.layers import GateUpLinear, QKVLinear, VocabEmbedding
from compiled_serve.models.registry import resolve_model_class
from compiled_serve.models.tp_layout import Range, even_range, qkv_row_ranges, section_row_ranges

_ROW_PARALLEL = ("o_proj", "down_proj")


@dataclass(frozen=True)
class ShardSpec:
    """How one parameter is sliced for one rank."""

    dim: int
    shape: tuple[int, ...]  # the shard's shape
    # checkpoint shard id (None: an unpacked tensor) -> [(source start, size, destination start)]
    pieces: dict[Any, list[tuple[int, int, int]]]
    source_sizes: dict[Any, int]  # checkpoint shard id -> that tensor's full size along `dim`


def _packed_spec(packed: QKVLinear | GateUpLinear, ranges: list[Range], full_shape: tuple[int, ...]) -> ShardSpec:
    pieces: dict[Any, list[tuple[int, int, int]]] = {}
    dst = 0
    for (shard_id, (section_start, _)), (start, size) in zip(packed.shard_offsets.items(), ranges):
        pieces[shard_id] = [(start - section_start, size, dst)]
        dst += size
    sizes = {sid: size for sid, (_, size) in packed.shard_offsets.items()}
    return ShardSpec(0, (dst, *full_shape[1:]), pieces, sizes)


def _even_spec(full_shape: tuple[int, ...], dim: int, rank: int, world_size: int, what: str) -> ShardSpec:
    start, size = even_range(full_shape[dim], rank, world_size, what)
    shape = list(full_shape)
    shape[dim] = size
    return ShardSpec(dim, tuple(shape), {None: [(start, size, 0)]}, {None: full_shape[dim]})


def shard_specs(module: nn.Module, config: ModelConfig, rank: int, world_size: int) -> dict[str, ShardSpec]:
    """Parameter name -> its ShardSpec, for every parameter rank `rank` holds only a slice of."""
    specs: dict[str, ShardSpec] = {}
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, QKVLinear):
            ranges = qkv_row_ranges(config.num_heads, config.num_kv_heads, config.head_dim, rank, world_size)
            for pname, p in m.named_parameters(recurse=False):
                specs[prefix + pname] = _packed_spec(m, ranges, tuple(p.shape))
        elif isinstance(m, GateUpLinear):
            sizes = [size for _, size in m.shard_offsets.values()]
            ranges = section_row_ranges(sizes, rank, world_size, f"{name} gate/up")
            specs[prefix + "weight"] = _packed_spec(m, ranges, tuple(m.weight.shape))
        elif isinstance(m, VocabEmbedding) or (isinstance(m, nn.Linear) and name == "lm_head"):
            specs[prefix + "weight"] = _even_spec(tuple(m.weight.shape), 0, rank, world_size, f"{name} vocabulary")
        elif isinstance(m, nn.Linear) and name.rpartition(".")[2] in _ROW_PARALLEL:
            if m.bias is not None:
                raise ValueError(f"{name}: a row-parallel linear with a bias is not supported")
            specs[prefix + "weight"] = _even_spec(tuple(m.weight.shape), 1, rank, world_size, f"{name} input dim")
    return specs


def _narrow(loaded: Any, dim: int, start: int, size: int) -> torch.Tensor:
    """Rows/columns [start, start + size) of a tensor, or read from a lazy safetensors slice."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = (slice(start, start + size),) if dim == 0 else (slice(None), slice(start, start + size))
    return loaded[index]


def full_shape(loaded: Any) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def _loader(shard: torch.Tensor, spec: ShardSpec, name: str) -> Callable[[Any, Any], None]:
    def load(loaded: Any, shard_id: Any) -> None:
        shape = full_shape(loaded)
        if shard_id not in spec.pieces or len(shape) != len(spec.shape) \
                or shape[spec.dim] != spec.source_sizes[shard_id]:
            raise ValueError(f"{name} shard {shard_id!r} has shape {shape}, which this rank's slice does not fit")
        for src, size, dst in spec.pieces[shard_id]:
            shard.narrow(spec.dim, dst, size).copy_(_narrow(loaded, spec.dim, src, size))

    return load


def build_tp_module(config: ModelConfig, dtype: torch.dtype, device: torch.device, rank: int,
                    world_size: int) -> nn.Module:
    """The whole model for rank `rank`: replicated tensors allocated on `device`, sharded ones as
    placeholders carrying their (uninitialized) shard. Raises ShardingError if it does not divide."""
    cls = resolve_model_class([config.architecture])
    with torch.device("meta"):
        module = cls(config)
    module.to(dtype=dtype)
    specs = shard_specs(module, config, rank, world_size)
    held: dict[str, torch.Tensor] = {}
    for name in specs:  # out of the module while the rest is materialized (no full-size allocation)
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        held[name] = owner._parameters[attr]
        owner._parameters[attr] = None
    module.to_empty(device=device)
    for name, spec in specs.items():
        owner_name, _, attr = name.rpartition(".")
        meta = held[name]
        param = nn.Parameter(torch.zeros((), dtype=meta.dtype, device=device).expand(meta.shape), requires_grad=False)
        param.tp_shard = torch.empty(spec.shape, dtype=meta.dtype, device=device)  # type: ignore[attr-defined]
        param.tp_weight_loader = _loader(param.tp_shard, spec, name)  # type: ignore[attr-defined]
        module.get_submodule(owner_name)._parameters[attr] = param
    return module.eval().requires_grad_(False)
