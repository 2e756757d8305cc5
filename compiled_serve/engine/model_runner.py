"""Turns a scheduled step into tensors, runs the compiled model, and returns the logits to sample.

Per step it builds, for the flat batch of T new tokens over S sequences:
  input_ids [T], positions [T], slot_mapping [T]          (one host->device copy each)
  block_tables [S, max_blocks], seq_lens [S], query_start_loc [S+1]
and only the last token of each sequence whose chunk completes it gets logits.

Decode steps (every sequence adds exactly one token) whose batch fits a bucket replay a CUDA
graph instead (`cuda_graphs.DecodeGraphs`), once `capture_decode_graphs` ran; everything else
calls the compiled step, whose token dimension is dynamic, so no batch size ever recompiles.
A step of one token is padded to MIN_STEP_TOKENS (see buckets.py) on CUDA: dynamo would compile a
graph of its own for a token count of 1. Not on the CPU: there a lone decode's matmuls at M = 1
take MKL's GEMV, and padded to M = 2 its SGEMM, which packs every weight matrix first and runs
the single-stream step at half the speed (docs/perf-notes.md, "the single-stream regression").
The CPU step instead marks the token dimension unbacked, so a count of 1 reuses the one graph.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from compiled_serve.engine.buckets import MIN_STEP_TOKENS
from compiled_serve.engine.cuda_graphs import DecodeGraphs
from compiled_serve.engine.host_copy import to_device
from compiled_serve.engine.persistent_batch import round_up_width
from compiled_serve.engine.scheduler import SchedulerOutput
from compiled_serve.kernels.forward_context import AttentionMetadata, forward_context


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, step_fn: Callable, kv_caches: list[torch.Tensor], block_size: int,
        device: torch.device,
    ):
        self.model = model
        # compiled forward(input_ids, positions) -> hidden [T, hidden]
        self.step_fn = step_fn if device.type == "cuda" else GuardsOffAfterWarmup(_unbacked_tokens(step_fn))
        self.min_step_tokens = MIN_STEP_TOKENS if device.type == "cuda" else 1
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self._pin = device.type == "cuda"
        # What graphs capture, and who hears of a new graph set before its capture: the step and
        # nobody, but under tensor parallelism the bare step and the driver (tp_engine.py).
        self.graph_step_fn = self.step_fn
        self.on_new_graphs: Callable[[DecodeGraphs, str], None] | None = None
        self.decode_graphs: DecodeGraphs | None = None
        self.mixed_graphs: DecodeGraphs | None = None  # token buckets for prefill/mixed steps
        self.num_graph_steps = 0  # steps served by captured graphs (stats, tests)
        self.num_mixed_graph_steps = 0  # of which prefill/mixed-step graphs

    def capture_decode_graphs(
        self, buckets: Sequence[int], max_model_len: int, capture: bool = True,
    ) -> DecodeGraphs:
        """Set up the static decode path; `capture=False` (or CPU) runs it without graphs."""
        max_blocks = round_up_width(-(-max_model_len // self.block_size))
        pool = self.mixed_graphs.pool if self.mixed_graphs is not None else None
        graphs = DecodeGraphs(self.graph_step_fn, self.kv_caches, buckets, max_blocks, max_model_len, self.device,
                              capture=capture, pool=pool)
        if self.on_new_graphs is not None:
            self.on_new_graphs(graphs, "decode")
        graphs.capture_all()
        self.decode_graphs = graphs
        return graphs

    def capture_mixed_graphs(
        self, token_buckets: Sequence[int], max_model_len: int, max_num_seqs: int,
    ) -> DecodeGraphs:
        """Graphs for prefill and mixed steps up to the largest token bucket; capture them before
        the decode graphs, which then share their (larger) memory pool."""
        max_blocks = round_up_width(-(-max_model_len // self.block_size))
        graphs = DecodeGraphs(self.graph_step_fn, self.kv_caches, token_buckets, max_blocks, max_model_len,
                              self.device, query_len=None, seq_capacity=max_num_seqs)
        if self.on_new_graphs is not None:
            self.on_new_graphs(graphs, "mixed")
        graphs.capture_all()
        self.mixed_graphs = graphs
        return graphs

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(torch.tensor(values, dtype=dtype, pin_memory=self._pin), self.device)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> tuple[torch.Tensor, list[int]]:
        """Returns (logits [N, vocab] float32, indices into sched.scheduled that were sampled)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        qsl = [0]
        sample_rows: list[int] = []
        logits_indices: list[int] = []
        max_blocks = 1
        for i, s in enumerate(sched.scheduled):
            seq, start, n = s.seq, s.seq.num_computed_tokens, s.num_new_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = seq.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            qsl.append(qsl[-1] + n)
            max_blocks = max(max_blocks, len(blocks))
            if s.completes_prompt:
                sample_rows.append(i)
                logits_indices.append(qsl[-1] - 1)
        graphs = self.decode_graphs
        if graphs is not None and len(input_ids) == len(seq_lens) and graphs.fits(len(seq_lens), max_blocks):
            # Pure decode: one token per sequence, so token row i is sequence i.
            hidden = graphs.run(input_ids, positions, slots, seq_lens, [s.seq.block_ids for s in sched.scheduled])
            self.num_graph_steps += 1
        else:
            hidden = self._run_dynamic(sched, input_ids, positions, slots, seq_lens, qsl, max_blocks)
        if not logits_indices:
            return hidden.new_empty((0, 0), dtype=torch.float32), []
        if len(logits_indices) == hidden.shape[0]:
            rows = hidden  # every token is sampled (decode): no gather
        else:
            rows = hidden[self._to_device(logits_indices, torch.int64)]
        return self.model.compute_logits(rows), sample_rows

    def _run_dynamic(
        self, sched: SchedulerOutput, input_ids: list[int], positions: list[int], slots: list[int],
        seq_lens: list[int], qsl: list[int], max_blocks: int,
    ) -> torch.Tensor:
        tables = [s.seq.block_ids + [0] * (max_blocks - len(s.seq.block_ids)) for s in sched.scheduled]
        pad = max(0, self.min_step_tokens - len(input_ids))
        if pad:
            # Padding tokens belong to no sequence (they sit past query_start_loc[-1]): slot -1
            # writes no cache entry and attention returns zeros for them; their rows are never read.
            input_ids, positions, slots = input_ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad
        meta = AttentionMetadata(
            slot_mapping=self._to_device(slots, torch.int64),
            block_tables=self._to_device(tables, torch.int32),
            seq_lens=self._to_device(seq_lens, torch.int32),
            query_start_loc=self._to_device(qsl, torch.int32),
            max_query_len=max(qsl[i + 1] - qsl[i] for i in range(len(seq_lens))),
            max_seq_len=max(seq_lens),
            kv_caches=self.kv_caches,
            seq_lens_host=seq_lens,
            query_start_loc_host=qsl,
        )
        ids = self._to_device(input_ids, torch.int64)
        pos = self._to_device(positions, torch.int64)
        with forward_context(meta):
            return self.step_fn(ids, pos)  # [T, hidden]


class GuardsOffAfterWarmup:
    """The CPU step, with dynamo's guard check skipped once the warm-up has compiled it.

    Each call of a `torch.compile`d function first evaluates its guards: on the embedded model's
    quantized step (the plain path, ~250 lifted parameters) that was 0.8 ms of a 17 ms decode step
    (torch.profiler, "TorchDynamo Cache Lookup"). After the warm-up the step has its one dynamic
    graph and nothing the engine passes can need another (token counts are unbacked, the KV caches
    and parameters are the engine's own for its life), so `arm()` makes later calls run under
    `skip_guard_eval_unsafe`: dynamo then checks only guards that tell cache entries apart. A
    step loaded from a build runs without guards already (build/precompiled.py).

    Given the compiled graph bound to the step's arguments (`arm(direct)`, passes/direct_call.py),
    later calls skip dynamo's frame altogether: no cache lookup and no bytecode gathering the
    graph's ~250 inputs (~0.5 ms of the single-stream step). `COMPILED_SERVE_DIRECT_STEP=0` keeps
    dynamo's path (the switch the tests compare against)."""

    def __init__(self, step_fn: Callable):
        self.step_fn = step_fn
        self.armed = False
        self.direct: Callable | None = None

    def arm(self, direct: Callable | None = None) -> None:
        self.armed = True
        if direct is not None and os.environ.get("COMPILED_SERVE_DIRECT_STEP", "1") != "0":
            self.direct = direct

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.direct is not None:
            return self.direct(input_ids, positions)
        if not self.armed:
            return self.step_fn(input_ids, positions)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return self.step_fn(input_ids, positions)


def _unbacked_tokens(step_fn: Callable) -> Callable:
    """The step with its token dimension unbacked: dynamo then neither specialises nor guards a
    count of 1, so one-token steps run the one dynamic graph unpadded."""

    def step(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        torch._dynamo.decorators.mark_unbacked(input_ids, 0)
        torch._dynamo.decorators.mark_unbacked(positions, 0)
        return step_fn(input_ids, positions)

    return step
