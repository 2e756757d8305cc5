"""The persistent batch: every running sequence owns a stable row of preallocated host state.

A row holds the sequence's token ids (prompt, outputs, and -1 for the one token still being
sampled on the device), its block table and its sampling parameters. Rows are written when
something changes (a sequence is admitted, a block is appended, a token comes back), never
rebuilt per step, so a step's inputs come out of a handful of vectorised numpy gathers:

  positions  = start of the row's chunk + offset within it          [T]
  input_ids  = token_ids[row, position]   (-1: filled on the device) [T]
  slots      = block_table[row, position // bs] * bs + position % bs [T]

Nothing here loops over tokens in Python; the loops that remain run once per scheduled
sequence and only copy a few ints. Row state is host-only (numpy); `step_inputs.py` packs
what a step needs into one pinned buffer for one host-to-device copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from compiled_serve.engine.scheduler import ScheduledSequence
from compiled_serve.engine.sequence import Sequence

PLACEHOLDER = -1  # a token sampled by a step still on the device
# Block-table widths are multiples of this: the attention kernel is specialised on the table's
# row stride (== 1, divisible by 16, other), and a width that changed class would compile anew.
TABLE_WIDTH_MULTIPLE = 16


class PersistentBatch:
    # Per-row float parameters, in the order the fused sampler takes them.
    FLOAT_FIELDS = ("temperature", "top_k", "top_p", "min_p", "greedy")

    def __init__(self, max_rows: int, max_model_len: int, block_size: int):
        self.max_rows = max_rows
        self.block_size = block_size
        self.max_blocks = round_up_width(-(-max_model_len // block_size))
        # int32 token ids, allocated lazily by the OS (np.zeros): only touched pages are resident.
        self.token_ids = np.zeros((max_rows, max_model_len), dtype=np.int32)
        self.block_table = np.zeros((max_rows, self.max_blocks), dtype=np.int32)
        self.num_written_blocks = np.zeros(max_rows, dtype=np.int64)
        self.sampling_floats = np.zeros((len(self.FLOAT_FIELDS), max_rows), dtype=np.float32)
        self.seeds = np.zeros(max_rows, dtype=np.int64)
        self.params_version = 0  # bumped when a row's sampling parameters change
        self.row_of: dict[Sequence, int] = {}
        self._free_rows = list(range(max_rows - 1, -1, -1))

    # ----------------------------------------------------------------- rows
    def reconcile(self, running: Iterable[Sequence]) -> None:
        """Frees the rows of sequences that left the running set (finished, aborted, preempted)."""
        alive = set(running)
        for seq in [s for s in self.row_of if s not in alive]:
            self._free_rows.append(self.row_of.pop(seq))

    def _add(self, seq: Sequence) -> int:
        if not self._free_rows:
            raise RuntimeError("persistent batch is full: more running sequences than max_num_seqs")
        row = self._free_rows.pop()
        self.row_of[seq] = row
        n = seq.num_tokens
        self.token_ids[row, :n] = seq.token_ids
        self.token_ids[row, n : n + seq.num_pending] = PLACEHOLDER
        self.num_written_blocks[row] = 0
        p = seq.params
        self.sampling_floats[:, row] = (p.temperature, float(p.top_k if p.top_k >= 1 else 0), p.top_p, p.min_p,
                                        float(p.greedy))
        self.seeds[row] = seq.seed
        self.params_version += 1
        return row

    def sync(self, scheduled: list[ScheduledSequence]) -> np.ndarray:
        """Rows of the scheduled sequences (admitting new ones), with their new blocks written."""
        rows = np.empty(len(scheduled), dtype=np.int64)
        for i, s in enumerate(scheduled):
            seq = s.seq
            row = self.row_of.get(seq)
            if row is None:
                row = self._add(seq)
            rows[i] = row
            have, blocks = int(self.num_written_blocks[row]), seq.block_ids
            if len(blocks) > have:
                self.block_table[row, have : len(blocks)] = blocks[have:]
                self.num_written_blocks[row] = len(blocks)
        return rows

    # --------------------------------------------------------------- tokens
    def add_placeholder(self, seq: Sequence) -> None:
        """The step just launched samples seq's next token: its slot reads -1 until it returns."""
        row = self.row_of.get(seq)
        if row is not None:
            self.token_ids[row, seq.num_tokens + seq.num_pending - 1] = PLACEHOLDER

    def write_token(self, seq: Sequence, token: int) -> None:
        """A sampled token came back (already appended to seq.token_ids)."""
        row = self.row_of.get(seq)
        if row is not None:
            self.token_ids[row, seq.num_tokens - 1] = token

    # ----------------------------------------------------------------- step
    def plan(self, scheduled: list[ScheduledSequence], rows: np.ndarray) -> StepPlan:
        """The flat-batch layout of one step (host numpy; no device work)."""
        num_seqs = len(scheduled)
        starts = np.empty(num_seqs, dtype=np.int64)
        counts = np.empty(num_seqs, dtype=np.int64)
        sampled = np.zeros(num_seqs, dtype=bool)
        for i, s in enumerate(scheduled):
            starts[i] = s.seq.num_computed_tokens
            counts[i] = s.num_new_tokens
            sampled[i] = s.completes_prompt
        qsl = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(counts, out=qsl[1:])
        num_tokens = int(qsl[-1])
        token_rows = np.repeat(rows, counts)  # [T] persistent row of each token
        positions = np.arange(num_tokens, dtype=np.int64) + np.repeat(starts - qsl[:-1], counts)
        input_ids = self.token_ids[token_rows, positions].astype(np.int64)
        bs = self.block_size
        slots = self.block_table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        seq_lens = starts + counts
        fill = np.flatnonzero(input_ids == PLACEHOLDER)  # tokens whose id is still on the device
        width = round_up_width(-(-int(seq_lens.max()) // bs) if num_seqs else 1)
        return StepPlan(
            rows=rows, input_ids=input_ids, positions=positions, slots=slots, seq_lens=seq_lens,
            query_start_loc=qsl, block_tables=self.block_table[rows, :width],
            fill_index=fill, fill_rows=token_rows[fill], sample_index=np.flatnonzero(sampled),
            max_query_len=int(counts.max()) if num_seqs else 0,
        )


@dataclass
class StepPlan:
    rows: np.ndarray  # [S] persistent row per scheduled sequence
    input_ids: np.ndarray  # [T] int64, PLACEHOLDER where the id is on the device
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64 cache slot
    seq_lens: np.ndarray  # [S] context after the step
    query_start_loc: np.ndarray  # [S + 1]
    block_tables: np.ndarray  # [S, W] int32
    fill_index: np.ndarray  # [F] token indices to fill from the device's last sampled ids
    fill_rows: np.ndarray  # [F] their persistent rows
    sample_index: np.ndarray  # [N] indices into the scheduled list that sample this step
    max_query_len: int

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.rows)

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == self.num_seqs

    @property
    def logits_index(self) -> np.ndarray:
        """Token row of each sampled sequence: its chunk's last token."""
        return self.query_start_loc[1:][self.sample_index] - 1


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def round_up_width(num_blocks: int) -> int:
    """A block-table width the attention kernel always sees in the same specialisation class."""
    return _round_up(num_blocks, TABLE_WIDTH_MULTIPLE)
