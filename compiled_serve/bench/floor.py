"""The physical floor of a workload (PERF.md): the least time the hardware allows.

Decode is memory-bound: each output token reads the KV of its whole context once, and each step
reads all the weights once. Prefill is compute-bound: 2 FLOPs per parameter per prompt token.

    kv_bytes_per_token = layers * 2 * kv_heads * head_dim * dtype_bytes
    floor_s = (sum_i sum_{j<out_i} (prompt_i + j) * kv_bytes_per_token + steps * weight_bytes) / bandwidth
              + 2 * params * total_prompt_tokens / matmul_rate

`weight_bytes` leaves out the input-embedding table (a step gathers a few rows of it) unless it
is tied to lm_head (then the logits read all of it); `steps` is the longest output.

With FP8 weights (`model_cost(..., quantization="fp8")`) the floor is FP8's own: the quantized
linears count one byte per weight plus their float32 per-channel scales, and their prompt FLOPs
run at twice the measured bf16 matmul rate (the H200's FP8 tensor-core peak is twice its bf16
one), so the floor stays a bound on what FP8 could reach, not on what bf16 could.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from compiled_serve.models.config import ModelConfig
from compiled_serve.models.layers import VocabEmbedding
from compiled_serve.models.loaders.base import build_empty_module


@dataclass(frozen=True)
class ModelCost:
    params: int  # every parameter once (a tied table counts once)
    weight_bytes: int  # what one step reads: all weights except an untied input embedding
    kv_bytes_per_token: int
    fp8_params: int = 0  # parameters in FP8 linears: their matmuls count at twice the bf16 rate


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float  # device-to-device copy, bytes read plus written
    matmul_flop_per_s: float


@dataclass(frozen=True)
class Floor:
    decode_s: float  # KV and weight reads
    prefill_s: float  # prompt FLOPs
    steps: int
    output_tokens: int
    prompt_tokens: int

    @property
    def seconds(self) -> float:
        return self.decode_s + self.prefill_s

    @property
    def out_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def decode_step_s(self) -> float:
        """The mean decode step: W3's floor per token (one request: 1 / decode tok/s)."""
        return self.decode_s / self.steps

    def to_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "seconds": self.seconds, "out_tok_s": self.out_tok_s,
                "decode_step_s": self.decode_step_s}


def model_cost(config: ModelConfig, dtype: torch.dtype, quantization: str | None = None,
               kv_cache_dtype: str | None = None) -> ModelCost:
    """Counts the parameters of the model as built (on the meta device: no memory); with
    quantization "fp8", the linears `quantize_linear_layers` quantizes as e4m3 (module doc); with
    kv_cache_dtype fp8 (fp8_e4m3), one byte per cached K/V value."""
    from compiled_serve.models.quantized import linear_weight_names

    module = build_empty_module(config, dtype, torch.device("meta"))
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    params = sum(p.numel() for p in module.parameters())  # shared (tied) parameters once
    embedding = sum(m.weight.numel() for m in module.modules() if isinstance(m, VocabEmbedding))
    read_per_step = params if config.tie_word_embeddings else params - embedding
    kv_bytes = 1 if kv_cache_dtype in ("fp8", "fp8_e4m3") else dtype_bytes
    kv = config.num_layers * 2 * config.num_kv_heads * config.head_dim * kv_bytes
    weight_bytes, fp8_params = read_per_step * dtype_bytes, 0
    if quantization == "fp8":
        shapes = dict(module.named_parameters())
        for name in linear_weight_names(module):
            rows, numel = shapes[name].shape[0], shapes[name].numel()
            fp8_params += numel
            weight_bytes -= numel * dtype_bytes - (numel + 4 * rows)  # e4m3 codes + float32 scales
    elif quantization not in (None, "none"):
        raise ValueError(f"no floor for quantization {quantization!r} (fp8 or none)")
    return ModelCost(params=params, weight_bytes=weight_bytes, kv_bytes_per_token=kv, fp8_params=fp8_params)


def workload_floor(cost: ModelCost, prompt_lens: list[int], output_lens: list[int], ceilings: Ceilings) -> Floor:
    # sum_{j<out} (prompt + j) = out * prompt + out * (out - 1) / 2
    kv_tokens = sum(out * prompt + out * (out - 1) // 2 for prompt, out in zip(prompt_lens, output_lens))
    steps = max(output_lens)
    decode_bytes = kv_tokens * cost.kv_bytes_per_token + steps * cost.weight_bytes
    prompt_tokens = sum(prompt_lens)
    return Floor(decode_s=decode_bytes / ceilings.copy_bytes_per_s,
                 prefill_s=2 * (cost.params - cost.fp8_params / 2) * prompt_tokens / ceilings.matmul_flop_per_s,
                 steps=steps, output_tokens=sum(output_lens), prompt_tokens=prompt_tokens)
