"""The device half of a step: one host-to-device copy, the forward, the fused sampler, and an
asynchronous copy of the sampled ids back, behind an event.

`launch(plan, ...)` enqueues the whole step and returns at once with an `InFlightStep`; the
engine prepares and launches the next step before it calls `InFlightStep.wait()`, so host work
overlaps the device's. Per step:

  1. one pinned buffer (int64 section, then int32 section) -> one non-blocking copy;
  2. ids the host does not know yet (the previous step's samples) are filled on the device from
     `next_tokens [rows]`, a persistent per-row tensor the sampler writes after every step;
  3. the forward: a decode CUDA graph (buffers filled by device-to-device copies) or the
     compiled dynamic step;
  4. logits of the sampled rows, the compiled logits tail with per-row parameters gathered on the
     device from the persistent batch's parameter table (re-uploaded only when a row changed);
  5. `next_tokens[rows] = sampled`, then the sampled ids (and logprobs, when asked) are copied
     into pinned host memory without blocking, and an event is recorded.

No step calls `.tolist()`, `.item()` or a blocking copy; `InFlightStep.wait()` is the one place
the host waits for the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from compiled_serve.engine.buckets import pick_bucket
from compiled_serve.engine.model_runner import ModelRunner
from compiled_serve.engine.persistent_batch import PersistentBatch, StepPlan
from compiled_serve.engine.step_sampler import TailInputs, raw_logprobs
from compiled_serve.kernels.forward_context import AttentionMetadata, forward_context


@dataclass
class InFlightStep:
    """A launched step: what it sampled, still in (pinned) host buffers the device is filling."""

    sampled_seqs: list  # Sequence per sampled row, in row order
    token_ids: torch.Tensor  # [N] int64 host
    logprobs: tuple[torch.Tensor, ...] | None  # host (logprob [N], rank [N], top ids [N, k], top values [N, k])
    event: torch.cuda.Event | None

    def wait(self) -> None:
        """The step's one host sync: blocks until its sampled ids are in host memory."""
        if self.event is not None:
            self.event.synchronize()


ALIGN = 16  # bytes: Triton specialises pointer arguments on 16-byte alignment


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _pack(parts: list[np.ndarray], pin: bool) -> torch.Tensor:
    """One byte buffer holding every array, each starting on a 16-byte boundary, so a view of
    any part has the same alignment every step (a kernel never sees a new specialisation)."""
    total = sum(_aligned(p.nbytes) for p in parts)
    host = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    view, at = host.numpy(), 0
    for p in parts:
        view[at : at + p.nbytes] = np.ascontiguousarray(p).view(np.uint8).ravel()
        at += _aligned(p.nbytes)
    return host


def _unpack(buf: torch.Tensor, parts: list[np.ndarray]) -> list[torch.Tensor]:
    """Device views of `_pack`'s parts, with their shapes and dtypes."""
    out, at = [], 0
    for p in parts:
        dtype = torch.int64 if p.dtype == np.int64 else torch.int32
        out.append(buf[at : at + p.nbytes].view(dtype).view(p.shape))
        at += _aligned(p.nbytes)
    return out


class StepRunner:
    """Runs steps on the model runner's compiled step and decode graphs (shared with it)."""

    def __init__(self, runner: ModelRunner, logits_tail: Callable, batch: PersistentBatch):
        self.runner = runner
        self.model, self.step_fn, self.kv_caches = runner.model, runner.step_fn, runner.kv_caches
        self.logits_tail = logits_tail
        self.batch = batch
        self.device = device = runner.device
        self.pin = device.type == "cuda"
        with torch.inference_mode():
            self.next_tokens = torch.zeros(batch.max_rows, dtype=torch.int64, device=device)
            # One tensor per parameter: each gather is a fresh (aligned) allocation.
            self._params = [torch.zeros(batch.max_rows, dtype=torch.float32, device=device)
                            for _ in batch.FLOAT_FIELDS]
            self._params_seed = torch.zeros(batch.max_rows, dtype=torch.int64, device=device)
        self._params_version = -1
        # Observer of every sampled step's raw logits (tests compare them with transformers).
        self.on_logits: Callable[[list, torch.Tensor], None] | None = None

    # ---------------------------------------------------------------- launch
    @torch.inference_mode()
    def launch(self, plan: StepPlan, scheduled_seqs: list, special_tail: TailInputs | None,
               offsets: np.ndarray, num_logprobs: int | None,
               late_bitmask: Callable[[], np.ndarray | None] | None = None) -> InFlightStep | None:
        """Enqueues one step. `offsets`: Philox counter per sampled row (output length incl. in flight).
        `special_tail`: tail inputs built on the host for rows with penalties, bias or suppression
        (the engine drains in-flight steps first for those); None = gather from the row table.
        `late_bitmask` (gathered tail only): called once the forward is enqueued, before the
        tail: the host's grammar masks (int32 [N, ceil(V/32)]) of the sampled rows, or None, so
        the engine finishes the previous step and fills the masks while the device runs the forward."""
        self._upload_params()
        graphs = self.runner.decode_graphs if plan.is_decode else self.runner.mixed_graphs
        bucket = None
        if graphs is not None:
            bucket = pick_bucket(graphs.buckets, plan.num_tokens)
            if bucket is not None and (plan.block_tables.shape[1] > graphs.max_blocks_per_seq
                                       or plan.num_seqs > graphs.seqs_for(bucket)):
                bucket = None
        pad = (bucket - plan.num_tokens) if bucket is not None else max(0, self.runner.min_step_tokens - plan.num_tokens)
        ids, pos, slots = plan.input_ids, plan.positions, plan.slots
        if pad:
            # Padding tokens belong to no sequence: slot -1 writes no cache entry; rows never read.
            z = np.zeros(pad, np.int64)
            ids, pos, slots = np.concatenate([ids, z]), np.concatenate([pos, z]), np.concatenate([slots, z - 1])
        if bucket is not None:  # the static layout: seq_lens [cap] | query_start_loc [cap + 1]
            cap, n = graphs.seq_capacity, plan.num_seqs
            meta = np.concatenate([plan.seq_lens, np.zeros(cap - n, np.int64), plan.query_start_loc,
                                   np.full(cap - n, plan.num_tokens, np.int64)])
        else:
            meta = np.concatenate([plan.seq_lens, plan.query_start_loc])
        sample_rows = plan.rows[plan.sample_index]
        parts = [ids, pos, slots, plan.fill_index, plan.fill_rows, plan.logits_index, sample_rows,
                 offsets.astype(np.int64), meta.astype(np.int32), plan.block_tables]
        buf = _pack(parts, self.pin).to(self.device, non_blocking=True)
        (d_ids, d_pos, d_slots, d_fill, d_fill_rows, d_logits_idx, d_sample_rows, d_offsets, d_meta,
         d_tables) = _unpack(buf, parts)
        if len(plan.fill_index):
            d_ids[d_fill] = self.next_tokens[d_fill_rows]

        if bucket is not None:
            hidden = graphs.replay(bucket, d_ids, d_pos, d_slots, d_meta, d_tables)[: plan.num_tokens]
            self.runner.num_graph_steps += 1
            if not plan.is_decode:
                self.runner.num_mixed_graph_steps += 1
        else:
            s = plan.num_seqs
            meta_obj = AttentionMetadata(
                slot_mapping=d_slots, block_tables=d_tables, seq_lens=d_meta[:s], query_start_loc=d_meta[s:],
                max_query_len=plan.max_query_len, max_seq_len=int(plan.seq_lens.max()), kv_caches=self.kv_caches,
                seq_lens_host=plan.seq_lens.tolist() if not self.pin else None,
                query_start_loc_host=plan.query_start_loc.tolist() if not self.pin else None,
            )
            with forward_context(meta_obj):
                # Own tensors, not views of the packed buffer: aliased or offset inputs would give
                # dynamo another graph.
                hidden = self.step_fn(d_ids.clone(), d_pos.clone())[: plan.num_tokens]
        if not len(plan.sample_index):
            return None
        rows = hidden if len(plan.sample_index) == plan.num_tokens else hidden[d_logits_idx]
        logits = self.model.compute_logits(rows)  # [N, V] float32
        seqs = [scheduled_seqs[i] for i in plan.sample_index.tolist()]
        if self.on_logits is not None:
            self.on_logits(seqs, logits)
        if special_tail is not None:
            # Own allocations: views into one packed buffer change alignment with the row count.
            # Contiguous too: a one-row slice (the penalty counts, [1, V] of [1, V + 1]) would keep
            # its parent's row stride through clone() and give the tail a graph of its own.
            args = tuple(a.clone(memory_format=torch.contiguous_format) if a is not None else None
                         for a in special_tail.args)
            sampled, _ = self.logits_tail(special_tail.edit_logits(logits), *args)
            tail_logprobs = None  # of the edited logits (bias, suppression): not the raw ones
        else:
            temperature, top_k, top_p, min_p, greedy = (t.index_select(0, d_sample_rows) for t in self._params)
            seeds = self._params_seed.index_select(0, d_sample_rows)
            args = (temperature, top_k.int(), top_p, min_p, seeds, d_offsets, greedy.bool()) + (None,) * 5
            masks = late_bitmask() if late_bitmask is not None else None
            if masks is not None:  # the tail's logprobs would be of the masked logits
                host = torch.from_numpy(masks)
                if self.pin:  # a pinned allocation, not pin_memory() (which asks the driver about the pointer)
                    host = torch.empty(masks.shape, dtype=torch.int32, pin_memory=True)
                    host.numpy()[:] = masks
                args += (host.to(self.device, non_blocking=True),)
            sampled, tail_logprobs = self.logits_tail(logits, *args)
            if masks is not None:
                tail_logprobs = None
        self.next_tokens.index_copy_(0, d_sample_rows, sampled)
        token_ids = self._to_host(sampled)
        lps = None
        if num_logprobs is not None:  # of the raw logits, before bias and suppression, as vLLM gives them
            out = raw_logprobs(logits, sampled, num_logprobs, tail_logprobs)
            lps = tuple(self._to_host(t) for t in (out.logprobs, out.ranks, out.top_ids, out.top_values)
                        if t is not None)
        event = None
        if self.pin:
            event = torch.cuda.Event()
            event.record()
        return InFlightStep(seqs, token_ids, lps, event)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if not self.pin:
            return t.clone()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def _upload_params(self) -> None:
        b = self.batch
        if b.params_version == self._params_version:
            return
        # One pinned staging buffer (pin_memory() per tensor asks the driver about every pointer:
        # ~0.4 ms a call), then one copy per parameter tensor.
        n = b.max_rows
        floats = torch.empty((len(self._params), n), dtype=torch.float32, pin_memory=self.pin)
        seeds = torch.empty(n, dtype=torch.int64, pin_memory=self.pin)
        floats.numpy()[:] = b.sampling_floats
        seeds.numpy()[:] = b.seeds
        for i, dst in enumerate(self._params):
            dst.copy_(floats[i], non_blocking=True)
        self._params_seed.copy_(seeds, non_blocking=True)
        self._params_version = b.params_version
