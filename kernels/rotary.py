"""Rotary position embedding as the custom op `compiled_serve::rotary_embedding`, with its reference.

`cos_sin_cache` is [max_pos, rot_dim]: cos in the first rot_dim/2 columns, sin in the rest.
`is_neox=True` rotates halves (Hugging Face `rotate_half`: pairs (x[i], x[i + rot_dim/2]));
`False` rotates interleaved pairs (x[2i], x[2i+1]), GPT-J style. Dims past rot_dim pass through.
Math is fp32 with one rounding at the end; outputs are fresh tensors (never aliases of q or k).
CUDA runs the Triton kernel (kernels/triton_rotary.py, imported lazily); other devices the reference.
"""

from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    # x: [num_tokens, heads, head_dim]; cos, sin: [num_tokens, 1, rot_dim / 2] fp32
    rot_dim = 2 * cos.shape[-1]
    xf = x.float()
    rot, rest = xf[..., :rot_dim], xf[..., rot_dim:]
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, rest), dim=-1).to(x.dtype)


def rotary_embedding_reference(
    positions: torch.Tensor,  # [num_tokens] int
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_pos, rot_dim]: cos | sin
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    cos_sin = cos_sin_cache[positions.long()].float()  # [num_tokens, rot_dim]
    cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)  # [num_tokens, 1, rot_dim / 2] each
    return _rotate(q, cos, sin, is_neox), _rotate(k, cos, sin, is_neox)


@torch.library.custom_op("compiled_serve::rotary_embedding", mutates_args=())
def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_rot [num_tokens, num_heads, head_dim], k_rot [num_tokens, num_kv_heads, head_dim])."""
    q_rot, k_rot = rotary_embedding_reference(positions, q, k, cos_sin_cache, is_neox)
    return q_rot.contiguous(), k_rot.contiguous()


@rotary_embedding.register_kernel("cuda")
def _(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    from compiled_serve.kernels.triton_rotary import rotary_embedding_triton

    return rotary_embedding_triton(positions, q, k, cos_sin_cache, is_neox)


@rotary_embedding.register_fake
def _(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape)
