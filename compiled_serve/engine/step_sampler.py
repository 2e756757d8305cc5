"""What `LLMEngine.step` samples with: the compiled tail's per-row tensors, the sparse logit edits,
and the raw-distribution logprobs a request may ask for.

Per step, for N sampled sequences:
  - one host->device copy of every per-row scalar (temperature, top-k/p, min-p, greedy, penalty
    factors as float32, then seeds and offsets as int64, packed into one byte buffer);
  - penalties all given or all None (two tail graphs, not four): a penalty that no row uses is
    passed as its exact no-op (repetition 1.0, frequency/presence 0.0);
  - a grammar bitmask (int32 [N, ceil(V/32)], one copy) only when some row is constrained;
    the other rows get all-ones words;
  - a row's randomness is Philox keyed by the sequence's seed, counter = its output length, so a
    draw depends on nothing but the sequence itself (batch invariant, preemption safe).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from compiled_serve.engine.host_copy import to_device
from compiled_serve.kernels.token_bitmask import bitmask_width
from compiled_serve.sampling_params import SamplingParams

_INT64 = 1 << 64


def wrap_int64(value: int) -> int:
    """`value` modulo 2^64 as a signed int64 (a seed of 2^63 - 1 plus a sample index wraps)."""
    value %= _INT64
    return value - _INT64 if value >= _INT64 // 2 else value


def token_counts(token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Occurrences of each token per row: [N, V] float32, built by one scatter_add on the device."""
    width = max((len(ids) for ids in token_lists), default=0)
    # [N, L] padded with the out-of-vocabulary id V, whose column is dropped afterwards.
    padded = torch.full((len(token_lists), width), vocab_size, dtype=torch.int64)
    for i, ids in enumerate(token_lists):
        padded[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
    padded = to_device(padded, device)
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


@dataclass
class TailRow:
    """One sequence's view of the step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    seed: int  # signed int64, the Philox key
    # eos + stop_token_ids while len(output_token_ids) < min_tokens: never sampled this step.
    suppressed_token_ids: Sequence[int] = field(default_factory=list)
    # int32 [ceil(V/32)] grammar-allowed tokens (engine/structured_state.py); None = unconstrained.
    bitmask: np.ndarray | None = None


class TailInputs(NamedTuple):
    """`logits_tail`'s arguments after the logits, and the sparse edits applied before it."""

    args: tuple[torch.Tensor | None, ...]  # temperature, top_k, top_p, min_p, seeds, offsets, greedy, penalties, bitmask
    bias_index: torch.Tensor | None  # [B] int64 flat indices row * V + token
    bias_values: torch.Tensor | None  # [B] float32
    suppress_index: torch.Tensor | None  # [S] int64 flat indices

    @staticmethod
    def build(rows: Sequence[TailRow], vocab_size: int, device: torch.device) -> TailInputs:
        params = [row.params for row in rows]
        n = len(rows)
        floats = torch.tensor(
            [
                [p.temperature for p in params],
                [float(p.top_k if p.top_k >= 1 else 0) for p in params],
                [p.top_p for p in params],
                [p.min_p for p in params],
                [float(p.greedy) for p in params],
                [p.repetition_penalty for p in params],
                [p.frequency_penalty for p in params],
                [p.presence_penalty for p in params],
            ],
            dtype=torch.float32,
        ).reshape(8, n)
        ints = torch.tensor(
            [[row.seed for row in rows], [len(row.output_token_ids) for row in rows]], dtype=torch.int64
        ).reshape(2, n)
        # One copy: [8, N] float32 bytes then [2, N] int64 bytes (32N, a multiple of 8: aligned).
        packed = to_device(torch.cat([floats.view(-1).view(torch.uint8), ints.view(-1).view(torch.uint8)]), device)
        split = floats.numel() * 4
        f = packed[:split].view(torch.float32).view(8, n)
        i = packed[split:].view(torch.int64).view(2, n)
        args: tuple[torch.Tensor | None, ...] = (f[0], f[1].int(), f[2], f[3], i[0], i[1], f[4].bool())
        if any(p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
               for p in params):  # fmt: skip
            counts = token_counts([row.output_token_ids for row in rows], vocab_size, device)  # [N, V]
            if any(p.repetition_penalty != 1.0 for p in params):
                seen = token_counts([row.prompt_token_ids + row.output_token_ids for row in rows], vocab_size, device) > 0
            else:
                seen = counts > 0  # unread: every row's repetition penalty is 1.0
            args += (f[5], seen, f[6], f[7], counts)
        else:
            args += (None,) * 5
        args += (_bitmask(rows, vocab_size, device),)
        bias = [(j, t, b) for j, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
        suppress = [j * vocab_size + t for j, row in enumerate(rows) for t in row.suppressed_token_ids]
        return TailInputs(
            args,
            to_device(torch.tensor([j * vocab_size + t for j, t, _ in bias], dtype=torch.int64), device) if bias else None,
            to_device(torch.tensor([b for _, _, b in bias], dtype=torch.float32), device) if bias else None,
            to_device(torch.tensor(suppress, dtype=torch.int64), device) if suppress else None,
        )  # fmt: skip

    def edit_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """logit_bias, then min-tokens suppression, on a copy (the raw logits stay for logprobs)."""
        if self.bias_index is None and self.suppress_index is None:
            return logits
        logits = logits.float().clone()  # [N, V]
        # Flat index_add_/index_fill_: unlike advanced-index assignment they never sync with the host.
        if self.bias_index is not None:
            logits.view(-1).index_add_(0, self.bias_index, self.bias_values)
        if self.suppress_index is not None:
            logits.view(-1).index_fill_(0, self.suppress_index, float("-inf"))
        return logits


def _bitmask(rows: Sequence[TailRow], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """int32 [N, ceil(V/32)] on the device when any row is constrained (-1 words: all allowed)."""
    if all(row.bitmask is None for row in rows):
        return None
    words = np.full((len(rows), bitmask_width(vocab_size)), -1, dtype=np.int32)
    for j, row in enumerate(rows):
        if row.bitmask is not None:
            words[j] = row.bitmask
    return to_device(torch.from_numpy(words), device)


class RawLogprobs(NamedTuple):
    logprobs: torch.Tensor  # [N] float32, the sampled token's logprob under the raw logits
    ranks: torch.Tensor  # [N] int64, 1 = the raw distribution's most likely token
    top_ids: torch.Tensor | None  # [N, k] int64, None when k == 0
    top_values: torch.Tensor | None  # [N, k] float32


def raw_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int, sampled_logprobs: torch.Tensor | None = None
) -> RawLogprobs:
    """Logprobs of the unprocessed logits [N, V] (as vLLM returns them), for the sampled tokens [N].

    No [N, V] log_softmax is materialised: with the row's log-normaliser lse, a logprob is
    `logit - lse`, the rank counts larger logits and the top entries are the logits' top-k
    shifted by lse. `sampled_logprobs` [N] is the fused sampler's own output when it sampled
    these very logits (then lse = logit[token] - logprob, and no reduction over V is needed for
    it); without it, lse is one logsumexp over the row.
    """
    x = logits.float()  # [N, V]; a no-op for the float32 logits the model computes
    token_logits = x.gather(1, token_ids[:, None])  # [N, 1]
    if sampled_logprobs is None:
        lse = x.logsumexp(dim=-1, keepdim=True)  # [N, 1]
        token_logprobs = (token_logits - lse)[:, 0]
    else:
        token_logprobs = sampled_logprobs.float()
        lse = token_logits - token_logprobs[:, None]
    ranks = (x > token_logits).sum(dim=-1) + 1  # [N]
    top_ids = top_values = None
    if num_logprobs > 0:
        top_logits, top_ids = x.topk(num_logprobs, dim=-1)  # [N, k] each
        top_values = top_logits - lse
    return RawLogprobs(token_logprobs, ranks, top_ids, top_values)
