"""Building blocks shared by every decoder: RMSNorm, RoPE, packed linears, SiLU·mul.

Plain PyTorch on purpose: graph passes later find and fuse these patterns (RMSNorm + residual,
SiLU·mul, RoPE), so each block is written the straightforward way, with no fused kernels and no
data-dependent control flow. Packed linears carry a `weight_loader` that places one Hugging Face
tensor (q, k, v / gate, up) into its slice of the packed weight.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = w * x / rms(x), computed in float32 like Hugging Face's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        # A float attribute would become a graph input (SymFloat read with .item()) when dynamo
        # captures with dynamic=True; a literal tuple is specialized into the graph as a constant.
        self._eps = (eps,)
        self.weight = nn.Parameter(torch.ones(dim))

    @property
    def eps(self) -> float:
        return self._eps[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], float32 on CPU (so every device gets the same bits)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(is_medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Neox / HF "rotate_half" RoPE tables: cos and sin computed from each step's positions.

    Apply as `x * cos + rotate_half(x) * sin` (done in the attention layer, where a pass can see it).
    """

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> RotaryEmbedding:
        # `to(dtype)` would round inv_freq and `to_empty()` (meta-device init) would leave it as
        # garbage; recompute it after every move so it is always exact float32.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [num_tokens] -> cos, sin: [num_tokens, 1, head_dim] (broadcast over heads)
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [num_tokens, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)


class PackedLinear(nn.Linear):
    """Several projections of the same input stacked on the output dim: one matmul instead of 2-3.

    `shard_offsets` maps a checkpoint shard id ("q"/"k"/"v", or 0/1 for gate/up) to its
    (start, size) rows. The loader is a method, not a parameter attribute, so it survives
    `to_empty()` (which replaces parameter objects).
    """

    def __init__(self, in_features: int, shards: dict[Any, int], bias: bool):
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shard_offsets: dict[Any, tuple[int, int]] = {}
        start = 0
        for shard_id, size in shards.items():
            self.shard_offsets[shard_id] = (start, size)
            start += size

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: Any) -> None:
        start, size = self.shard_offsets[shard_id]
        target = param.data.narrow(0, start, size)
        check_shape(target, loaded, f"shard {shard_id!r}")
        target.copy_(loaded)


class QKVLinear(PackedLinear):
    """weight: [(num_heads + 2 * num_kv_heads) * head_dim, hidden]; shards "q", "k", "v"."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool):
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}, bias)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # qkv: [num_tokens, q_size + 2 * kv_size] -> q [num_tokens, q_size], k, v [num_tokens, kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return q, k, v


class GateUpLinear(PackedLinear):
    """weight: [2 * intermediate, hidden]; shards 0 (gate) and 1 (up)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__(hidden_size, {0: intermediate_size, 1: intermediate_size}, bias=False)


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    check_shape(param, loaded, "tensor")
    param.data.copy_(loaded)


def check_shape(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if param.shape != loaded.shape:
        # Caught and re-raised with the checkpoint name by `load_hf_weights`.
        raise ValueError(f"{what} has shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")


class VocabEmbedding(nn.Module):
    """Token embedding table [vocab, hidden]. Not nn.Embedding: its float `norm_type` attribute
    would become a graph input under dynamic capture."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [num_tokens] -> [num_tokens, hidden]
        return F.embedding(input_ids, self.weight)


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, 2 * intermediate] -> [num_tokens, intermediate]
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
