"""Tile shapes and split-KV counts for the unified paged-attention kernel.

Measured on an H100 (torch 2.11, Triton 3.6; bench/kernels_bench.py, Llama-8B heads 32q/8kv/128,
bf16, CUDA-graph replays). Decode: 16-row tiles, 64-key steps, 3 stages were best or within 3%
of best among the configs tried, at 92-97% of the device-to-device copy bandwidth for batches
that fill the GPU. Re-measured on the H200 (bench/attention_sweep.py,
bench/results/attention_sweep-nvidia-h200.json): 128-key steps with 2 stages beat 64/3 at every
workload shape: W2's 128 sequences 126 -> 118 us a layer, W1's 256 227 -> 219 us, one W3
sequence at 16 splits 9.9 -> 9.0 us; more splits than today's rule gave never more than ~1 us. Prefill: 128-row tiles with 64-key steps were best on average (~300 TFLOP/s
for a 4096-token causal prefill). Batches too small to fill the GPU split each sequence's keys
over up to 16 programs (1 seq x 4096 ctx: 112 us -> 16 us). fp32 inputs (exact fp32 dots, no
tensor cores) get small tiles: the bf16 shapes took ~a minute to compile and run in fp32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

MAX_SPLITS = 16
MIN_KEYS_PER_SPLIT = 256


class AttentionTiles(NamedTuple):
    block_m: int  # query rows per program: BLOCK_Q tokens x GROUP heads
    block_q: int
    tile_n: int  # keys per inner iteration
    num_warps: int
    num_stages: int


def decode_tiles(group: int, head_dim: int, dtype: torch.dtype) -> AttentionTiles:
    """Narrow tiles for sequences with few new tokens (decode, speculative verification)."""
    del head_dim  # same shapes for 64 and 128 so far
    block_m = max(16, triton.next_power_of_2(group))
    tile_n, stages = (32, 2) if dtype == torch.float32 else (128, 2)
    return AttentionTiles(block_m, max(1, block_m // group), tile_n, 4, stages)


def prefill_tiles(group: int, head_dim: int, dtype: torch.dtype) -> AttentionTiles:
    """Wide tiles for prefill chunks: more rows per K/V load, bigger matrix products."""
    del head_dim
    if dtype == torch.float32:  # exact fp32 dots run on FMA units: smaller tiles compile and run faster
        block_m = max(32, triton.next_power_of_2(group))
        return AttentionTiles(block_m, max(1, block_m // group), 32, 4, 2)
    block_m = max(128, triton.next_power_of_2(group))
    return AttentionTiles(block_m, max(1, block_m // group), 64, 4, 3)


@functools.lru_cache(maxsize=8)
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def choose_num_splits(num_programs: int, max_seq_len: int, sms: int) -> int:
    """KV splits per decode program, for batches too small to fill the GPU.

    Splits are sized so the programs cover ~2 waves and each keeps >= MIN_KEYS_PER_SPLIT keys of
    `max_seq_len`; both are hints: any count is correct, whatever the real lengths.
    """
    by_occupancy = -(-2 * sms // max(1, num_programs))
    by_length = max(1, max_seq_len // MIN_KEYS_PER_SPLIT)
    splits = min(MAX_SPLITS, by_occupancy, by_length)
    return 1 if splits <= 1 else triton.next_power_of_2(splits)
