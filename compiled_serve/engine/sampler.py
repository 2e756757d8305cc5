"""Pure-torch sampler: logits processing, sampling and logprobs for one decode step.

This is the reference a fused Triton sampling kernel will be tested against, so it is plain
row-wise tensor code. Per step:

    raw logits [N, V]
      -> logit_bias -> min_tokens suppression -> repetition penalty -> frequency/presence
      -> greedy rows: argmax
      -> temperature -> top-k -> top-p -> min-p -> exponential-race sample

Logprobs are those of the raw model distribution (log_softmax of the unprocessed logits), as
vLLM returns them by default.

Sampling is `argmax(probs / E)` with `E ~ Exp(1)` i.i.d. per token (the exponential race): it
picks token i with probability probs[i]. A row with its own `torch.Generator` draws exactly V
exponentials per step from it, so a seeded request's tokens do not depend on its batch
neighbours. `sample()` makes no host round trip: no `.item()`, no `.tolist()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from compiled_serve.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One sequence's view of the step: its parameters, history and random state."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None  # the request's own (seeded) generator
    # Token ids that must not be sampled this step: the engine passes eos + stop_token_ids
    # while len(output_token_ids) < min_tokens.
    suppressed_token_ids: Sequence[int] = field(default_factory=list)


class SamplerOutput(NamedTuple):
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor  # [N] float32, raw-distribution logprob of the sampled token
    top_logprob_ids: torch.Tensor | None  # [N, k] int64, None when k == 0
    top_logprob_values: torch.Tensor | None  # [N, k] float32
    ranks: torch.Tensor  # [N] int64, 1 = the raw distribution's most likely token


@dataclass
class SamplingBatch:
    """The step's sampling inputs as device tensors, built once per step from the rows."""

    vocab_size: int
    temperature: torch.Tensor  # [N] float32; 1.0 on greedy rows (their argmax is taken first)
    top_k: torch.Tensor  # [N] int64; vocab_size where disabled
    top_p: torch.Tensor  # [N] float32; 1.0 = disabled
    min_p: torch.Tensor  # [N] float32; 0.0 = disabled
    greedy: torch.Tensor  # [N] bool
    generators: list[torch.Generator | None]  # per row; None = the shared default generator
    # Optional processors: None when no row in the batch uses them.
    repetition_penalty: torch.Tensor | None = None  # [N] float32
    seen_mask: torch.Tensor | None = None  # [N, V] bool, token occurs in prompt or output
    frequency_penalty: torch.Tensor | None = None  # [N] float32
    presence_penalty: torch.Tensor | None = None  # [N] float32
    output_counts: torch.Tensor | None = None  # [N, V] float32, occurrences in the output
    # Sparse per-row token lists as flat indices into logits.view(-1): row * V + token.
    bias_index: torch.Tensor | None = None  # [B] int64
    bias_values: torch.Tensor | None = None  # [B] float32
    suppress_index: torch.Tensor | None = None  # [S] int64
    # Host-side flags, decided at build time so that sample() never asks the device.
    all_greedy: bool = False
    any_greedy: bool = False
    do_top_k: bool = False
    do_top_p: bool = False
    do_min_p: bool = False

    @property
    def num_rows(self) -> int:
        return len(self.generators)

    @staticmethod
    def build(rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str) -> SamplingBatch:
        device = torch.device(device)
        params = [row.params for row in rows]
        greedy = [p.greedy for p in params]
        top_k = [p.top_k if p.top_k >= 1 and not g else vocab_size for p, g in zip(params, greedy)]
        # One host tensor, one copy to the device: [5, N] (temperature, top_k, top_p, min_p, greedy).
        scalars = _to_device(
            torch.tensor(
                [
                    [1.0 if g else p.temperature for p, g in zip(params, greedy)],
                    [float(min(k, vocab_size)) for k in top_k],
                    [1.0 if g else p.top_p for p, g in zip(params, greedy)],
                    [0.0 if g else p.min_p for p, g in zip(params, greedy)],
                    [float(g) for g in greedy],
                ],
                dtype=torch.float32,
            ).reshape(5, len(rows)),
            device,
        )
        batch = SamplingBatch(
            vocab_size=vocab_size,
            temperature=scalars[0],
            top_k=scalars[1].long(),
            top_p=scalars[2],
            min_p=scalars[3],
            greedy=scalars[4].bool(),
            generators=[row.generator for row in rows],
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            do_top_k=any(k < vocab_size for k in top_k),
            do_top_p=any(p.top_p < 1.0 and not g for p, g in zip(params, greedy)),
            do_min_p=any(p.min_p > 0.0 and not g for p, g in zip(params, greedy)),
        )
        if any(p.repetition_penalty != 1.0 for p in params):
            batch.repetition_penalty = _to_device(
                torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32), device
            )
            seen = [row.prompt_token_ids + row.output_token_ids for row in rows]
            batch.seen_mask = _token_counts(seen, vocab_size, device) > 0
        if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
            penalties = torch.tensor(
                [[p.frequency_penalty for p in params], [p.presence_penalty for p in params]],
                dtype=torch.float32,
            ).reshape(2, len(rows))
            penalties = _to_device(penalties, device)
            batch.frequency_penalty, batch.presence_penalty = penalties[0], penalties[1]
            batch.output_counts = _token_counts([row.output_token_ids for row in rows], vocab_size, device)
        bias = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
        if bias:
            batch.bias_index = _long([i * vocab_size + t for i, t, _ in bias], device)
            batch.bias_values = _to_device(torch.tensor([b for _, _, b in bias], dtype=torch.float32), device)
        suppress = [i * vocab_size + t for i, row in enumerate(rows) for t in row.suppressed_token_ids]
        if suppress:
            batch.suppress_index = _long(suppress, device)
        return batch


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _long(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return _to_device(torch.tensor(values, dtype=torch.int64), device)


def _token_counts(token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Occurrences of each token per row: [N, V] float32, built by one scatter_add on the device."""
    width = max((len(ids) for ids in token_lists), default=0)
    # [N, L] padded with the out-of-vocabulary id V, whose column is dropped afterwards.
    padded = torch.full((len(token_lists), width), vocab_size, dtype=torch.int64)
    for i, ids in enumerate(token_lists):
        padded[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
    padded = _to_device(padded, device)
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logit_bias -> suppression -> repetition -> frequency/presence. [N, V] -> new [N, V]."""
    if batch.bias_index is not None or batch.suppress_index is not None:
        logits = logits.clone()  # the caller's raw logits stay untouched
    # Flat index_add_/index_fill_: unlike advanced-index assignment they never sync with the host.
    if batch.bias_index is not None:
        logits.view(-1).index_add_(0, batch.bias_index, batch.bias_values)
    if batch.suppress_index is not None:
        logits.view(-1).index_fill_(0, batch.suppress_index, float("-inf"))
    if batch.repetition_penalty is not None:
        # HF RepetitionPenaltyLogitsProcessor: seen tokens' positive logits are divided by the
        # penalty, negative ones multiplied, so p > 1 always makes them less likely.
        penalty = batch.repetition_penalty[:, None]  # [N, 1]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(batch.seen_mask, penalized, logits)
    if batch.output_counts is not None:
        # OpenAI: logit -= frequency * count + presence * (count > 0), over output tokens.
        counts = batch.output_counts  # [N, V]
        logits = logits - batch.frequency_penalty[:, None] * counts
        logits = logits - batch.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Masks (to -inf) the tokens that top-k, then top-p, then min-p exclude. [N, V] -> [N, V].

    Semantics follow HF's warpers: top-k keeps ties with the k-th value; top-p keeps the
    smallest prefix of the descending distribution whose mass reaches p (the token crossing p
    is kept); min-p keeps tokens with prob >= min_p * max prob. Each sees the distribution
    renormalized after the previous one.
    """
    if batch.do_top_k or batch.do_top_p:
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [N, V] each
        if batch.do_top_k:
            kth = sorted_logits.gather(1, (batch.top_k - 1)[:, None])  # [N, 1]
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        if batch.do_top_p:
            probs = sorted_logits.softmax(dim=-1)  # [N, V]
            mass_before = probs.cumsum(dim=-1) - probs  # [N, V] mass of strictly better tokens
            # mass_before is exactly 0 for the top token and top_p > 0, so one token always stays.
            drop = (mass_before >= batch.top_p[:, None]) & (batch.top_p[:, None] < 1.0)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)
    if batch.do_min_p:
        probs = logits.softmax(dim=-1)  # [N, V]
        threshold = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [N, 1]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def exponential_noise(batch: SamplingBatch, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Exp(1) noise [N, V]: one batched draw for unseeded rows, V draws from each row's own generator."""
    noise = torch.empty(shape, dtype=torch.float32, device=device).exponential_()
    for i, generator in enumerate(batch.generators):
        if generator is not None:
            noise[i].exponential_(generator=generator)
    # Exp(1) may return exactly 0 in float32; keep probs / noise finite (never 0/0 = NaN).
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


def sample(logits: torch.Tensor, batch: SamplingBatch, num_logprobs: int) -> SamplerOutput:
    """Picks one token per row. logits: [N, V] float32 (unmodified). num_logprobs: batch max k."""
    logits = logits.float()
    raw_logprobs = logits.log_softmax(dim=-1)  # [N, V]

    processed = apply_penalties(logits, batch)  # [N, V]
    token_ids = processed.argmax(dim=-1) if batch.any_greedy else None  # [N]
    if not batch.all_greedy:
        scaled = processed / batch.temperature[:, None]  # [N, V]
        scaled = apply_top_k_top_p_min_p(scaled, batch)
        probs = scaled.softmax(dim=-1)  # [N, V]
        noise = exponential_noise(batch, tuple(probs.shape), probs.device)
        sampled = (probs / noise).argmax(dim=-1)  # [N]
        token_ids = sampled if token_ids is None else torch.where(batch.greedy, token_ids, sampled)
    assert token_ids is not None

    token_logprobs = raw_logprobs.gather(1, token_ids[:, None])  # [N, 1]
    ranks = (raw_logprobs > token_logprobs).sum(dim=-1) + 1  # [N]
    top_ids = top_values = None
    if num_logprobs > 0:
        top_values, top_ids = raw_logprobs.topk(num_logprobs, dim=-1)  # [N, k] each
    return SamplerOutput(token_ids, token_logprobs[:, 0], top_ids, top_values, ranks)
