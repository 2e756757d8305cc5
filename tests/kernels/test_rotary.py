"""Rotary embedding: reference against Hugging Face's rotate_half form, Triton kernel, custom op."""

from __future__ import annotations

import pytest
import torch

from compiled_serve.kernels.rotary import rotary_embedding, rotary_embedding_reference


def _cos_sin_cache(max_pos: int, rot_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)  # [max_pos, rot_dim / 2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_pos, rot_dim]


def _hf_rope(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Hugging Face's apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, cos/sin repeated twice."""
    half = cache.shape[-1] // 2
    cos = cache[positions, :half].repeat(1, 2)[:, None]  # [T, 1, head_dim]
    sin = cache[positions, half:].repeat(1, 2)[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _inputs(
    seed: int, heads: int, kv_heads: int, head_dim: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 100, (6,), generator=gen)
    q = torch.randn(6, heads, head_dim, generator=gen)
    k = torch.randn(6, kv_heads, head_dim, generator=gen)
    return positions.to(device), q.to(device), k.to(device)


def test_reference_matches_hugging_face_rotate_half() -> None:
    positions, q, k = _inputs(0, 4, 2, 64)
    cache = _cos_sin_cache(128, 64)
    q_rot, k_rot = rotary_embedding_reference(positions, q, k, cache)
    torch.testing.assert_close(q_rot, _hf_rope(q, positions, cache))
    torch.testing.assert_close(k_rot, _hf_rope(k, positions, cache))


def test_interleaved_style_is_a_permuted_neox() -> None:
    """GPT-J pairs (2i, 2i+1) are neox halves (i, i + D/2) under a fixed permutation of dims."""
    positions, q, k = _inputs(1, 2, 1, 32)
    cache = _cos_sin_cache(128, 32)
    perm = torch.arange(32).view(2, 16).t().reshape(-1)  # interleaved index -> halves index
    q_rot, _ = rotary_embedding_reference(positions, q[..., perm], k[..., perm], cache, is_neox=False)
    q_neox, _ = rotary_embedding_reference(positions, q, k, cache, is_neox=True)
    torch.testing.assert_close(q_rot, q_neox[..., perm])


def test_op_passes_opcheck() -> None:
    positions, q, k = _inputs(2, 4, 2, 32)
    cache = _cos_sin_cache(128, 32)
    torch.library.opcheck(rotary_embedding, (positions, q, k, cache, True))
    q_rot, k_rot = rotary_embedding(positions, q, k, cache)
    q_ref, k_ref = rotary_embedding_reference(positions, q, k, cache)
    torch.testing.assert_close(q_rot, q_ref)
    torch.testing.assert_close(k_rot, k_ref)


@pytest.mark.parametrize(
    ("is_neox", "head_dim", "rot_dim"), [(True, 64, 64), (False, 128, 128), (True, 64, 32)]
)
def test_triton_matches_reference(
    is_neox: bool, head_dim: int, rot_dim: int, triton_device: str, rel_err
) -> None:
    from compiled_serve.kernels.triton_rotary import rotary_embedding_triton

    positions, _, _ = _inputs(3, 4, 2, head_dim, triton_device)
    # q and k as strided views of one packed qkv buffer, as the model leaves them.
    qkv = torch.randn(6, (4 + 2 + 2) * head_dim).to(triton_device)
    q = qkv[:, : 4 * head_dim].view(6, 4, head_dim)
    k = qkv[:, 4 * head_dim : 6 * head_dim].view(6, 2, head_dim)
    cache = _cos_sin_cache(128, rot_dim).to(triton_device)
    q_rot, k_rot = rotary_embedding_triton(positions, q, k, cache, is_neox)
    q_ref, k_ref = rotary_embedding_reference(positions, q, k, cache, is_neox)
    assert rel_err(q_rot, q_ref) < 1e-5
    assert rel_err(k_rot, k_ref) < 1e-5


@pytest.mark.gpu
def test_op_on_cuda(cuda_device: str, rel_err) -> None:
    positions = torch.randint(0, 8192, (1000,), device=cuda_device)
    q = torch.randn(1000, 32, 128, device=cuda_device, dtype=torch.bfloat16)
    k = torch.randn(1000, 8, 128, device=cuda_device, dtype=torch.bfloat16)
    cache = _cos_sin_cache(8192, 128).to(cuda_device)
    q_rot, k_rot = rotary_embedding(positions, q, k, cache)
    q_ref, k_ref = rotary_embedding_reference(positions, q, k, cache)
    assert rel_err(q_rot, q_ref) < 1e-2
    assert rel_err(k_rot, k_ref) < 1e-2
