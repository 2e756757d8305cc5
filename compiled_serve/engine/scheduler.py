"""Continuous batching under a per-step token budget.

There are no prefill and decode phases: every running sequence asks for the tokens it has not
computed yet (one for a decoding sequence, a chunk of the prompt for a prefilling one), up to
the step's budget. Running sequences go first, in arrival order; waiting ones are admitted
FCFS while blocks, budget and `max_num_seqs` allow. When blocks run out, the most recently
admitted running sequence is preempted: its blocks are freed and it is recomputed later.

Asynchronous scheduling: a step is scheduled while the previous one still runs, so a sequence
may have a token in flight (`Sequence.num_pending`). It counts as a token to compute (its id
reaches the step on the device). A sequence whose in-flight token is its last allowed one is
not scheduled again: it finishes when that token comes back. A preempted sequence is not
re-admitted while a token of it is in flight.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from compiled_serve.engine.block_manager import BlockManager
from compiled_serve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """True when this chunk reaches the sequence's last token, so the step samples for it."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens + self.seq.num_pending


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


def bucket_fit_excess(step_tokens: int, buckets: tuple[int, ...]) -> int:
    """Tokens by which a step of `step_tokens` overshoots the largest bucket below it, when that
    overshoot is small (<= 1/8 of the bucket) and a larger bucket would pad it; else 0.

    A 1,024-token prompt admitted beside one decode makes a 1,025-token step, which replays the
    1,536-token graph: a third of the step is padding. Stopping the prompt's chunk at the bucket
    and computing its last token(s) in the next step (with the decodes) costs one small step
    instead. Steps above the largest bucket run without a graph and are never padded.
    """
    if not buckets or step_tokens > buckets[-1]:
        return 0
    lower = max((b for b in buckets if b < step_tokens), default=0)
    excess = step_tokens - lower
    return excess if lower and excess <= lower // 8 else 0


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 graph_token_buckets: tuple[int, ...] = ()):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Token sizes of the mixed-step CUDA graphs (ascending; empty: no graphs, no padding).
        # Admitted prompt chunks are trimmed so a step does not just overshoot one.
        self.graph_token_buckets = tuple(sorted(graph_token_buckets))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Ends a sequence (finished or aborted) wherever it is, returning its blocks."""
        seq.status = status
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # 1. Running sequences, oldest first; preempt from the back when blocks run out.
        kept: list[Sequence] = []
        queue = list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            if seq.num_pending and len(seq.output_token_ids) + seq.num_pending >= seq.max_output_tokens:
                kept.append(seq)  # its last token is in flight: nothing left to compute
                continue
            num_new = min(seq.num_tokens + seq.num_pending - seq.num_computed_tokens, budget)
            while not bm.allocate_slots(seq, num_new):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                kept.append(seq)
                out.scheduled.append(ScheduledSequence(seq, num_new))
                budget -= num_new
        kept.extend(queue)  # over budget this step: stay running, keep their blocks
        self.running = kept

        # 2. Waiting sequences, FCFS, only if nothing was preempted (no thrashing).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.num_preempted:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # preempted with a token in flight: admitted once it is back
            cached = bm.find_cached_prefix(seq) if seq.num_computed_tokens == 0 else []
            num_cached = len(cached) * bm.block_size
            num_new = min(seq.num_tokens - seq.num_computed_tokens - num_cached, budget)
            excess = bucket_fit_excess(self.max_num_batched_tokens - budget + num_new, self.graph_token_buckets)
            fits_bucket = 0 < excess < num_new
            if fits_bucket:
                num_new -= excess  # trimmed before allocating: no block is published unwritten
            if not bm.allocate_slots(seq, num_new, cached):
                break
            self.waiting.popleft()
            if seq.num_computed_tokens == 0:
                bm.record_prefix_lookup(seq.num_tokens, num_cached)
            seq.num_computed_tokens += num_cached
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
            if fits_bucket:
                break  # the step ends on a graph's size: one more admission would overshoot it again
        return out
