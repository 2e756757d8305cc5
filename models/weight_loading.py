"""Map Hugging Face checkpoint tensors onto a model's parameters, one tensor at a time.

Every weight format yields `(hf_name, tensor)` pairs; models differ from the checkpoint only in
packed projections (q/k/v -> qkv_proj, gate/up -> gate_up_proj). `load_hf_weights` renames,
routes packed shards to the owning layer's `weight_loader`, and refuses a checkpoint that does not
cover the model exactly (missing or unexpected tensors are named, five at most).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from compiled_serve.errors import ModelLoadError
from compiled_serve.models.layers import PackedLinear, default_weight_loader
from compiled_serve.phase_progress import report_progress

# (our packed param fragment, checkpoint fragment, shard id)
StackedParamsMapping = tuple[tuple[str, str, Any], ...]

_SHOW = 5


def load_hf_weights(
    module: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked: StackedParamsMapping,
    skip: Callable[[str], bool] = lambda name: False,
) -> None:
    params = dict(module.named_parameters())
    owners = {name: module.get_submodule(name.rpartition(".")[0]) for name in params}
    expected: set[tuple[str, Any]] = set()
    for name, owner in owners.items():
        shards = owner.shard_offsets if isinstance(owner, PackedLinear) else {None: None}
        expected.update((name, shard) for shard in shards)

    loaded: set[tuple[str, Any]] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for ckpt_name, tensor in weights:
            if skip(ckpt_name):
                continue
            name, shard = _rename(ckpt_name, stacked)
            param = params.get(name)
            if param is None:
                unexpected.append(ckpt_name)
                continue
            try:
                tp_loader = getattr(param, "tp_weight_loader", None)  # a tensor-parallel shard
                if tp_loader is not None:
                    tp_loader(tensor, shard)  # reads only this rank's rows/columns
                elif shard is None:
                    default_weight_loader(param, materialize(tensor))
                else:
                    owners[name].weight_loader(param, materialize(tensor), shard)
            except (ValueError, KeyError) as e:
                raise ModelLoadError(f"checkpoint tensor {ckpt_name!r}: {e}") from e
            loaded.add((name, shard))
            report_progress("loading weights", len(loaded), len(expected))  # a bar on a terminal

    arch = type(module).__name__
    if unexpected:
        raise ModelLoadError(
            f"checkpoint has {len(unexpected)} tensor(s) that {arch} does not use: "
            f"{_preview(unexpected)}; is the architecture in config right?"
        )
    missing = sorted(_checkpoint_name(name, shard, stacked) for name, shard in expected - loaded)
    if missing:
        raise ModelLoadError(
            f"checkpoint lacks {len(missing)} tensor(s) that {arch} needs: {_preview(missing)}"
        )


def materialize(tensor: Any) -> torch.Tensor:
    """A tensor, read whole if it is a lazy safetensors slice (what tensor-parallel loads yield)."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor[:]


def _rename(ckpt_name: str, stacked: StackedParamsMapping) -> tuple[str, Any]:
    for packed, part, shard in stacked:
        if part in ckpt_name:
            return ckpt_name.replace(part, packed), shard
    return ckpt_name, None


def _checkpoint_name(name: str, shard: Any, stacked: StackedParamsMapping) -> str:
    for packed, part, shard_id in stacked:
        if shard is not None and shard == shard_id and packed in name:
            return name.replace(packed, part)
    return name


def _preview(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (f", ... ({len(names) - _SHOW} more)" if len(names) > _SHOW else "")
