"""CUDA graphs for decode steps: one graph per batch bucket, replayed from static input buffers.

A decode step (every sequence adds one token) of n sequences is padded to the smallest bucket
b >= n and replayed from the graph captured for b. The graph reads its inputs from static
buffers, so a step only copies its inputs in (five small host->device copies) and launches it:

  input_ids [B], positions [B], slot_mapping [B] int64
  meta32 [2B + 1] int32: seq_lens [B] | query_start_loc [B + 1]
  block_tables [B, max_blocks_per_seq] int32
(B = the largest bucket.) The model's inputs are `input_ids[:b]` and `positions[:b]`, prefixes of
their own buffers: a view at a non-zero storage offset (a row of one packed buffer) makes dynamo
compile another graph. The forward context during capture and replay points at views of
these buffers, so the paged-attention kernels read them wherever they are in the graph.

Padding rows (n..b) carry slot -1 (the KV write skips them), seq_len 0 and an empty query range
(query_start_loc stays at n), so they neither write the cache nor read it; their hidden rows
are garbage the runner never looks at.

Graphs are captured largest bucket first into one memory pool (`torch.cuda.graph_pool_handle`):
a smaller graph's activations fit inside the larger one's blocks, so the pool costs about one
largest-bucket step. `max_seq_len` is baked into a capture (it picks the attention kernel's
split count), so graphs are captured with the engine's `max_model_len`: correct for any context.

Memory accounting (see `measure_capture_bytes`): the graph pool is private, so the KV cache
sizing cannot reuse memory the profile step freed. Before the KV cache exists the engine
captures the largest bucket once against a one-block scratch cache, measures how much the pool
reserved, frees it, and subtracts that (with a margin) from the KV budget; the real capture then
happens after the cache is allocated. `DecodeGraphs(capture=False)` runs the same static-buffer
path without graphs: that is how the CPU tests exercise padding and buffer handling.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence

import torch

from compiled_serve.engine.buckets import normalize_buckets, pick_bucket
from compiled_serve.kernels.forward_context import AttentionMetadata, forward_context
from compiled_serve.phase_progress import report_progress

logger = logging.getLogger("compiled_serve.engine")

# Slack on the measured pool size: later, smaller captures may need a few extra blocks.
CAPTURE_MARGIN = 1.25
CAPTURE_OVERHEAD_BYTES_PER_GRAPH = 2 << 20


def pad_decode_inputs(
    input_ids: Sequence[int], positions: Sequence[int], slots: Sequence[int], seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]], bucket: int, max_bucket: int, pin: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host tensors for one padded decode step (n = len(input_ids) <= bucket).

    Returns (ids64 [3, bucket], meta32 [2 * max_bucket + 1], tables [bucket, width]): the layouts
    of the static buffers, padding rows filled with slot -1, seq_len 0 and empty query ranges.
    """
    n = len(input_ids)
    pad = bucket - n
    ids64 = torch.tensor([list(input_ids) + [0] * pad, list(positions) + [0] * pad, list(slots) + [-1] * pad],
                         dtype=torch.int64, pin_memory=pin)
    qsl = list(range(n + 1)) + [n] * (max_bucket - n)  # one token per real row, then empty ranges
    lens = list(seq_lens) + [0] * (max_bucket - n)
    meta32 = torch.tensor(lens + qsl, dtype=torch.int32, pin_memory=pin)
    width = max(1, max((len(t) for t in block_tables), default=1))
    rows = [list(t) + [0] * (width - len(t)) for t in block_tables] + [[0] * width] * pad
    tables = torch.tensor(rows, dtype=torch.int32, pin_memory=pin)
    return ids64, meta32, tables


class DecodeGraphs:
    """Static step buffers plus one captured graph per token bucket (all in one memory pool).

    `query_len=1`: decode graphs (bucket b = b sequences of one token). `query_len=None`: mixed
    graphs, for steps whose sequences add any number of tokens (prefill chunks beside decodes):
    bucket b holds b tokens of up to min(b, seq_capacity) sequences, padded with empty sequences
    (seq_len 0, an empty query range), and is captured with max_query_len = b, so attention takes
    its two-launch path (narrow tiles for the short rows, wide tiles for the rest), which any
    batch of that shape replays correctly.
    """

    def __init__(
        self, step_fn: Callable, kv_caches: list[torch.Tensor], buckets: Sequence[int], max_blocks_per_seq: int,
        max_seq_len: int, device: torch.device, capture: bool = True, query_len: int | None = 1,
        seq_capacity: int | None = None, pool: object | None = None,
    ):
        self.step_fn = step_fn  # compiled forward(input_ids, positions) -> hidden [T, hidden]
        self.kv_caches = kv_caches
        self.buckets = normalize_buckets(buckets)  # never below MIN_STEP_TOKENS
        self.max_bucket = big = self.buckets[-1]
        self.query_len = query_len
        self.kind = "decode" if query_len == 1 else "mixed-step"  # what the log and progress call it
        self.seq_capacity = cap = min(seq_capacity or big, big)  # sequences of the largest bucket
        self.pool = pool  # shared with other graph sets (captured largest first), or made here
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_seq_len = max_seq_len
        self.device = device
        self.use_graphs = capture and device.type == "cuda"
        # Inference tensors, like the runner's per-step inputs: a normal tensor carries another
        # dispatch key, and dynamo would compile a second graph for it.
        with torch.inference_mode():
            self.input_ids = torch.zeros(big, dtype=torch.int64, device=device)
            self.positions = torch.zeros(big, dtype=torch.int64, device=device)
            self.slot_mapping = torch.full((big,), -1, dtype=torch.int64, device=device)
            self.meta32 = torch.zeros(2 * cap + 1, dtype=torch.int32, device=device)  # seq_lens | qsl
            self.block_tables = torch.zeros(cap, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> hidden [bucket, hidden], in the pool
        self.pool_bytes = 0  # what the captures reserved, measured
        self.capture_seconds = 0.0
        # Tensor parallel (tp_engine.py): called with (bucket, table rows) once the static buffers
        # hold a step and before its graph runs, so rank 0 can broadcast them to the workers.
        self.before_replay: Callable[[int, int], None] | None = None

    def replay_inputs(self, bucket: int, rows: int) -> list[torch.Tensor]:
        """The static buffers a replay of `bucket` reads, contiguous (what rank 0 broadcasts):
        input_ids, positions, slot_mapping [bucket], meta32, block_tables [rows, max_blocks]."""
        return [self.input_ids[:bucket], self.positions[:bucket], self.slot_mapping[:bucket], self.meta32,
                self.block_tables[:rows]]

    def launch(self, bucket: int) -> torch.Tensor:
        """Runs `bucket` on what the static buffers hold -> hidden [bucket, hidden]."""
        graph = self.graphs.get(bucket)
        if graph is None:  # no capture (CPU, or capture=False): the same buffers, run directly
            return self._run_static(bucket)
        graph.replay()
        return self.outputs[bucket]

    def seqs_for(self, bucket: int) -> int:
        """How many sequences a step of this bucket may hold."""
        return min(bucket, self.seq_capacity)

    def metadata(self, bucket: int) -> AttentionMetadata:
        cap, seqs = self.seq_capacity, self.seqs_for(bucket)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket],
            block_tables=self.block_tables[:seqs],
            seq_lens=self.meta32[:seqs],
            query_start_loc=self.meta32[cap:cap + seqs + 1],
            max_query_len=self.query_len or bucket,
            max_seq_len=self.max_seq_len,
            kv_caches=self.kv_caches,
        )

    def _run_static(self, bucket: int) -> torch.Tensor:
        with forward_context(self.metadata(bucket)):
            return self.step_fn(self.input_ids[:bucket], self.positions[:bucket])  # [bucket, hidden]

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket, largest first, into one pool. The buffers hold an all-padding batch.
        Each capture is a step of the phase's progress (a bar on a terminal); the log gets one line."""
        if not self.use_graphs:
            return
        start = time.perf_counter()
        self.meta32.zero_()
        self.slot_mapping.fill_(-1)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        for bucket in sorted(self.buckets, reverse=True):
            self._run_static(bucket)  # warm-up outside the graph: compiles, autotunes, loads kernels
            torch.cuda.synchronize(self.device)
            # Only the capture allocates from the private pool; warm-ups use the shared one.
            reserved = torch.cuda.memory_reserved(self.device)
            graph = torch.cuda.CUDAGraph()
            with forward_context(self.metadata(bucket)), torch.cuda.graph(graph, pool=self.pool):
                self.outputs[bucket] = self.step_fn(self.input_ids[:bucket], self.positions[:bucket])
            torch.cuda.synchronize(self.device)
            self.pool_bytes += max(0, torch.cuda.memory_reserved(self.device) - reserved)
            self.graphs[bucket] = graph
            report_progress(f"capturing {self.kind} CUDA graphs", len(self.graphs), len(self.buckets))
        for graph in self.graphs.values():  # the first replay uploads the graph: pay it before ready
            graph.replay()
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured %d %s CUDA graph(s) in %.2fs, pool %.1f MiB", len(self.graphs), self.kind,
                    self.capture_seconds, self.pool_bytes / 2**20)

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.max_bucket and max_blocks <= self.max_blocks_per_seq

    def run(
        self, input_ids: Sequence[int], positions: Sequence[int], slots: Sequence[int], seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """One decode step of n = len(input_ids) sequences -> hidden [n, hidden] (a view into the pool)."""
        n = len(input_ids)
        bucket = pick_bucket(self.buckets, n)
        assert bucket is not None and self.fits(n, max(len(t) for t in block_tables))
        pin = self.device.type == "cuda"
        ids64, meta32, tables = pad_decode_inputs(input_ids, positions, slots, seq_lens, block_tables,
                                                  bucket, self.max_bucket, pin)
        self.input_ids[:bucket].copy_(ids64[0], non_blocking=True)
        self.positions[:bucket].copy_(ids64[1], non_blocking=True)
        self.slot_mapping[:bucket].copy_(ids64[2], non_blocking=True)
        self.meta32.copy_(meta32, non_blocking=True)
        self.block_tables[:bucket, : tables.shape[1]].copy_(tables, non_blocking=True)
        if self.before_replay is not None:
            self.before_replay(bucket, bucket)
        return self.launch(bucket)[:n]

    def replay(
        self, bucket: int, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
        meta32: torch.Tensor, block_tables: torch.Tensor,
    ) -> torch.Tensor:
        """A padded step whose inputs are already on the device (device-to-device copies into the
        static buffers, then the graph): ids/positions/slots [bucket], meta32 in the static layout
        [2 * seq_capacity + 1], block_tables [n, width] -> hidden [bucket, hidden]."""
        n, width = block_tables.shape
        self.input_ids[:bucket].copy_(input_ids)
        self.positions[:bucket].copy_(positions)
        self.slot_mapping[:bucket].copy_(slots)
        self.meta32.copy_(meta32)
        self.block_tables[:n, :width].copy_(block_tables)
        if self.before_replay is not None:
            self.before_replay(bucket, n)
        return self.launch(bucket)

    def release(self) -> None:
        self.graphs.clear()
        self.outputs.clear()
        self.pool = None


def measure_capture_bytes(
    step_fn: Callable, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
    bucket: int, max_seq_len: int, device: torch.device,
) -> int:
    """Bytes the decode-graph pool will need: capture the largest bucket against a one-block
    scratch cache, measure, free everything. Also compiles the step ahead of the real warm-up."""
    scratch = [torch.zeros(2, 1, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
               for _ in range(num_layers)]
    graphs = DecodeGraphs(step_fn, scratch, [bucket], 1, max_seq_len, device)
    graphs.capture_all()
    measured = graphs.pool_bytes
    graphs.release()
    del graphs, scratch
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return int(measured * CAPTURE_MARGIN)


def capture_cost_estimate(measured_largest: int, num_buckets: int) -> int:
    return measured_largest + CAPTURE_OVERHEAD_BYTES_PER_GRAPH * num_buckets
