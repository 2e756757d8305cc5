"""Shared helpers for kernel tests: a random paged batch and the interpreter/CUDA gate."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import pytest
import torch


@pytest.fixture
def triton_device() -> str:
    """Where Triton kernels run: 'cuda', or 'cpu' under TRITON_INTERPRET=1; skips otherwise."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def cuda_device() -> str:
    """For @pytest.mark.gpu tests: 'cuda' (the root conftest already skips them without CUDA)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs CUDA with compiled (not interpreted) Triton")
    return "cuda"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.fixture(name="rel_err")
def rel_err_fixture() -> Callable[[torch.Tensor, torch.Tensor], float]:
    return rel_err


@dataclasses.dataclass
class PagedBatch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim] (num_tokens includes padding rows)
    k: torch.Tensor  # [num_tokens, num_kv_heads, head_dim] this step's new keys
    v: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim], random everywhere
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 on padding rows
    seq_lens_host: list[int]
    query_start_loc_host: list[int]
    max_query_len: int
    max_seq_len: int


def make_paged_batch(
    seqs: list[tuple[int, int]],  # (context length incl. new tokens, new tokens) per sequence
    *,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    pad_rows: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> PagedBatch:
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-ctx // block_size) for ctx, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks nobody owns
    max_blocks = max(blocks_per_seq) + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    # Unused table entries point far out of range: reading one would fault or fail the check.
    block_tables = torch.full((len(seqs), max_blocks), 1 << 20, dtype=torch.int32)
    slots: list[int] = []
    qsl = [0]
    for i, ((ctx, q_len), n) in enumerate(zip(seqs, blocks_per_seq)):
        owned = [perm.pop() for _ in range(n)]
        block_tables[i, :n] = torch.tensor(owned, dtype=torch.int32)
        for pos in range(ctx - q_len, ctx):
            slots.append(owned[pos // block_size] * block_size + pos % block_size)
        qsl.append(qsl[-1] + q_len)
    slots += [-1] * pad_rows
    num_tokens = qsl[-1] + pad_rows
    num_heads = num_kv_heads * group

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    return PagedBatch(
        q=randn(num_tokens, num_heads, head_dim),
        k=randn(num_tokens, num_kv_heads, head_dim),
        v=randn(num_tokens, num_kv_heads, head_dim),
        kv_cache=randn(2, num_blocks, block_size, num_kv_heads, head_dim),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor([c for c, _ in seqs], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        seq_lens_host=[c for c, _ in seqs],
        query_start_loc_host=qsl,
        max_query_len=max(q for _, q in seqs),
        max_seq_len=max(c for c, _ in seqs),
    )


@pytest.fixture(name="make_paged_batch")
def make_paged_batch_fixture() -> Callable[..., PagedBatch]:
    return make_paged_batch
