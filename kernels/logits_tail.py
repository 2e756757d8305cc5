"""The logits tail in plain PyTorch: the one sampling reference, and the graph the engine compiles.

    logits [N, V]
      -> grammar bitmask: -inf on disallowed tokens (`compiled_serve::token_bitmask`), when given
      -> repetition penalty (over seen_mask) -> frequency / presence penalty (over output_counts)
      -> greedy rows: argmax
      -> temperature -> top-k / top-p / min-p (`compiled_serve::sampling_filter`) -> softmax
      -> exponential race with Philox noise (`compiled_serve::philox_exponential`)
      -> token ids, and the sampled token's logprob under the raw (unpenalised) logits

Three things are this one function:
  - the reference: every sampler test and the Triton kernel (kernels/triton_sampler.py) are
    checked against it;
  - the source graph: `compile_logits_tail` (passes/logits_tail_pipeline.py) captures it with
    dynamo and `FusedSamplingPass` rewrites the whole chain into one `compiled_serve::fused_sample`;
  - that op's implementation off CUDA (kernels/fused_sampling.py calls it eagerly).
Logit bias and min-tokens suppression are sparse exact edits the caller applies to `logits`
beforehand. A penalty group is None when no row uses it, which dynamo resolves at trace time, so
the captured graph holds only the penalties in use. Sampling is `argmax(probs / E)`, E ~ Exp(1)
per token (it picks token i with probability probs[i]), E from Philox keyed by the row's seed at
counter = its offset (kernels/philox.py).
"""

from __future__ import annotations

import torch

import compiled_serve.kernels.sampling_stages  # noqa: F401  (registers the stage ops)
import compiled_serve.kernels.token_bitmask  # noqa: F401  (registers token_bitmask)


def apply_penalties(
    raw: torch.Tensor,  # [N, V] float32
    repetition_penalty: torch.Tensor | None = None,  # [N] float32
    seen_mask: torch.Tensor | None = None,  # [N, V] bool, token in prompt or output
    frequency_penalty: torch.Tensor | None = None,  # [N] float32
    presence_penalty: torch.Tensor | None = None,  # [N] float32
    output_counts: torch.Tensor | None = None,  # [N, V] float32, occurrences in the output
) -> torch.Tensor:
    """HF repetition penalty, then OpenAI frequency / presence: [N, V] -> new [N, V]."""
    penalised = raw
    if repetition_penalty is not None and seen_mask is not None:
        # HF: a seen token's positive logit is divided by the penalty, a negative one multiplied.
        penalty = repetition_penalty[:, None]  # [N, 1]
        penalised = torch.where(
            seen_mask, torch.where(penalised > 0, penalised / penalty, penalised * penalty), penalised
        )
    if frequency_penalty is not None and presence_penalty is not None and output_counts is not None:
        # OpenAI: logit -= frequency * count + presence * (count > 0), over output tokens.
        penalised = penalised - frequency_penalty[:, None] * output_counts
        penalised = penalised - presence_penalty[:, None] * (output_counts > 0).float()
    return penalised


def logits_tail(
    logits: torch.Tensor,  # [N, V] float
    temperature: torch.Tensor,  # [N] float32; rows with temperature <= 0 are greedy
    top_k: torch.Tensor,  # [N] int32, <= 0 = off
    top_p: torch.Tensor,  # [N] float32, 1 = off
    min_p: torch.Tensor,  # [N] float32, 0 = off
    seeds: torch.Tensor,  # [N] int64, the row's Philox key
    offsets: torch.Tensor,  # [N] int64, the row's step counter
    greedy: torch.Tensor,  # [N] bool
    repetition_penalty: torch.Tensor | None = None,  # [N] float32
    seen_mask: torch.Tensor | None = None,  # [N, V] bool, token in prompt or output
    frequency_penalty: torch.Tensor | None = None,  # [N] float32
    presence_penalty: torch.Tensor | None = None,  # [N] float32
    output_counts: torch.Tensor | None = None,  # [N, V] float32, occurrences in the output
    bitmask: torch.Tensor | None = None,  # [N, ceil(V/32)] int32, grammar-allowed tokens (bit set)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_ids [N] int64, logprobs [N] float32). With a bitmask, logprobs are those of the masked row."""
    raw, penalised = _masked_and_penalised(logits, bitmask, repetition_penalty, seen_mask, frequency_penalty,
                                           presence_penalty, output_counts)  # fmt: skip
    greedy = greedy | (temperature <= 0)  # [N]
    scaled = penalised / torch.where(greedy, 1.0, temperature)[:, None]  # [N, V]
    filtered = torch.ops.compiled_serve.sampling_filter(scaled, top_k, top_p, min_p)  # [N, V]
    probs = filtered.softmax(dim=-1)  # [N, V]
    noise = torch.ops.compiled_serve.philox_exponential(seeds, offsets, greedy, logits.shape[-1])  # [N, V]
    sampled = (probs / noise).argmax(dim=-1)  # [N]
    token_ids = torch.where(greedy, penalised.argmax(dim=-1), sampled)  # [N]
    return token_ids, _raw_logprobs(raw, token_ids)


def _masked_and_penalised(logits: torch.Tensor, bitmask: torch.Tensor | None, *penalties: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw [N, V] float32 after the grammar mask, -inf where disallowed; raw after the penalties)."""
    raw = logits.float()
    if bitmask is not None:
        raw = torch.ops.compiled_serve.token_bitmask(raw, bitmask)
    return raw, apply_penalties(raw, *penalties)


def _raw_logprobs(raw: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Each row's chosen token's logprob under the unpenalised distribution: [N]."""
    return raw.log_softmax(dim=-1).gather(1, token_ids[:, None])[:, 0]


def greedy_tail(
    logits: torch.Tensor,
    repetition_penalty: torch.Tensor | None = None,
    seen_mask: torch.Tensor | None = None,
    frequency_penalty: torch.Tensor | None = None,
    presence_penalty: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
    bitmask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits_tail` when every row is greedy: the same ops on the greedy branch, bit for bit, without
    the filter, the softmax and the noise no row uses (~0.25 ms of a ~7 ms CPU decode step over a
    49,152-token vocabulary). A caller that knows all rows are greedy (the CPU op checks) takes it."""
    raw, penalised = _masked_and_penalised(logits, bitmask, repetition_penalty, seen_mask, frequency_penalty,
                                           presence_penalty, output_counts)  # fmt: skip
    token_ids = penalised.argmax(dim=-1)
    return token_ids, _raw_logprobs(raw, token_ids)

