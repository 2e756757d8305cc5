"""Sizing and allocating the paged KV cache.

On CUDA the cache takes what is left of `gpu_memory_utilization * total` after the weights and
the peak activation of a full-budget step (measured by a profile run). On CPU it takes a fixed,
configurable number of GiB, mapped lazily (zero pages committed on first write). Each layer has
its own tensor.
"""

from __future__ import annotations

import torch


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def num_blocks_for_cpu(cache_gib: float, bytes_per_block: int) -> int:
    return max(1, int(cache_gib * (1 << 30)) // bytes_per_block)


def num_blocks_for_cuda(
    device: torch.device, utilization: float, peak_activation_bytes: int, bytes_per_block: int
) -> int:
    free, total = torch.cuda.mem_get_info(device)
    used = total - free  # weights, CUDA context, other processes
    budget = int(total * utilization) - used - peak_activation_bytes
    if budget < bytes_per_block:
        raise RuntimeError(
            f"no GPU memory left for the KV cache: {used / 2**30:.1f} GiB in use of "
            f"{total / 2**30:.1f} GiB, activation peak {peak_activation_bytes / 2**30:.2f} GiB; "
            "raise gpu_memory_utilization or lower max_num_batched_tokens"
        )
    return budget // bytes_per_block


def allocate_kv_cache(
    num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: torch.device,
) -> list[torch.Tensor]:
    # Per layer [2 (k, v), num_blocks, block_size, num_kv_heads, head_dim], each its own allocation:
    # the compiled step takes the caches as graph inputs, and views of one tensor would be aliased
    # inputs, whose overlap analysis cannot reason about the unbacked num_blocks.
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    if torch.device(device).type == "cpu":
        return [lazy_zeros_cpu(shape, dtype) for _ in range(num_layers)]
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]


def lazy_zeros_cpu(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor in its own anonymous mapping: the kernel hands out zero pages and commits each
    only when it is first written, so a CPU KV cache costs resident memory for the blocks in use,
    not its whole budget (`torch.zeros` writes every page: the default 1 GiB was resident at once).
    Zero, not uninitialized: attention reads the unwritten tail of a sequence's last block (masked,
    so it must be finite)."""
    import math
    import mmap

    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=dtype, count=math.prod(shape)).view(shape)  # keeps `buf` alive
