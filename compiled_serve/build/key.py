"""The `BuildKey` of an engine: everything that changes what `compile` produces for it.

Model config + weight fingerprint (from the loader), each pass's uuid (source hash) in pipeline
order, the decode bucket list, dtype, compile mode, and the toolchain (torch/triton versions,
device capability) of this process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from compiled_serve.cache import BuildKey
from compiled_serve.models.config import ModelConfig
from compiled_serve.passes.pipeline import pipeline_uuids


def engine_build_key(
    model_config: ModelConfig, weight_fingerprint: str, buckets: Sequence[int], dtype: torch.dtype,
    compile_mode: str, device: torch.device, passes: object | None = None,
) -> BuildKey:
    return BuildKey.for_current_toolchain(
        model_config=model_config.to_dict(),
        weight_fingerprint=weight_fingerprint,
        passes=pipeline_uuids(passes),
        buckets=tuple(buckets),
        dtype=str(dtype).removeprefix("torch."),
        compile_mode=compile_mode,
        device=str(device),
    )
