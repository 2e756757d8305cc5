"""The logits tail as one op: penalties, temperature, top-k, top-p, min-p and a seeded sample per row.

`compiled_serve::fused_sample(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy,
repetition_penalty=None, seen_mask=None, frequency_penalty=None, presence_penalty=None,
output_counts=None, bitmask=None) -> (token_ids, logprobs)` takes logits [N, V] (logit bias and
min-tokens suppression already applied: they are sparse exact edits) and returns one token per row and its
log-prob under log_softmax(logits), the unpenalised distribution. Its semantics are `logits_tail`
(kernels/logits_tail.py), the one pure-torch reference: HF repetition penalty over `seen_mask`
(token in prompt or output), then OpenAI frequency/presence over `output_counts`, each group given
whole or not at all (None when no row uses it); temperature, top-k, top-p, min-p; the
exponential race `argmax(probs / E)` with Philox noise keyed by (seed, offset) (kernels/philox.py);
greedy rows (and rows with temperature <= 0) take the argmax of the penalised logits. Parameter
conventions: top_k <= 0 or >= V is off, top_p in (0, 1] with 1 off, min_p in [0, 1] with 0 off.

A grammar `bitmask` (int32 [N, ceil(V/32)], kernels/token_bitmask.py) sets disallowed tokens
to -inf before everything else, so logprobs then come from the masked row. Without one (every
unconstrained batch) nothing extra runs: the argument is None and the graph has no mask node.

CUDA runs the Triton kernel (kernels/triton_sampler.py, imported lazily so CPU installs need no
Triton), after the bitmask's own Triton pass (kernels/triton_token_bitmask.py); every other device runs `logits_tail` itself,
or on the CPU, when every row is greedy, `greedy_tail` (its greedy branch alone, the same bits).
"""

from __future__ import annotations

import torch

from compiled_serve.kernels.logits_tail import greedy_tail, logits_tail
from compiled_serve.kernels.token_bitmask import check_bitmask


def check_penalty_inputs(
    logits: torch.Tensor,
    repetition_penalty: torch.Tensor | None,
    seen_mask: torch.Tensor | None,
    frequency_penalty: torch.Tensor | None,
    presence_penalty: torch.Tensor | None,
    output_counts: torch.Tensor | None,
) -> None:
    """Each penalty group comes whole or not at all, with [N] factors and [N, V] token tables."""
    groups = {
        "repetition_penalty, seen_mask": (repetition_penalty, seen_mask),
        "frequency_penalty, presence_penalty, output_counts": (frequency_penalty, presence_penalty, output_counts),
    }
    for names, group in groups.items():
        if any(t is None for t in group) and not all(t is None for t in group):
            raise ValueError(f"fused_sample: pass all of ({names}) or none of them")
    rows = logits.shape[:1]
    for name, t, shape in (
        ("repetition_penalty", repetition_penalty, rows), ("frequency_penalty", frequency_penalty, rows),
        ("presence_penalty", presence_penalty, rows), ("seen_mask", seen_mask, logits.shape),
        ("output_counts", output_counts, logits.shape),
    ):  # fmt: skip
        if t is not None and t.shape != shape:
            raise ValueError(f"fused_sample: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if seen_mask is not None and seen_mask.dtype != torch.bool:
        raise ValueError(f"fused_sample: seen_mask must be bool, got {seen_mask.dtype}")


@torch.library.custom_op("compiled_serve::fused_sample", mutates_args=())
def fused_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    greedy: torch.Tensor,
    repetition_penalty: torch.Tensor | None = None,
    seen_mask: torch.Tensor | None = None,
    frequency_penalty: torch.Tensor | None = None,
    presence_penalty: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
    bitmask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] and [N] per-row settings -> (token_ids [N] int64, logprobs [N] float32)."""
    check_penalty_inputs(logits, repetition_penalty, seen_mask, frequency_penalty, presence_penalty, output_counts)
    if bitmask is not None:
        check_bitmask(logits, bitmask)
    if logits.device.type == "cpu" and bool((greedy | (temperature <= 0)).all()):  # no sync to pay on the CPU
        return greedy_tail(logits, repetition_penalty, seen_mask, frequency_penalty, presence_penalty,
                           output_counts, bitmask)  # fmt: skip
    return logits_tail(
        logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy,
        repetition_penalty, seen_mask, frequency_penalty, presence_penalty, output_counts, bitmask,
    )  # fmt: skip


@fused_sample.register_kernel("cuda")
def _(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    greedy: torch.Tensor,
    repetition_penalty: torch.Tensor | None = None,
    seen_mask: torch.Tensor | None = None,
    frequency_penalty: torch.Tensor | None = None,
    presence_penalty: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
    bitmask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from compiled_serve.kernels.triton_sampler import fused_sample_triton

    if bitmask is not None:  # one bandwidth-bound pass; the sampler then sees -inf like a suppression
        logits = torch.ops.compiled_serve.token_bitmask(logits, bitmask)
    return fused_sample_triton(
        logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy,
        repetition_penalty, seen_mask, frequency_penalty, presence_penalty, output_counts,
    )  # fmt: skip


@fused_sample.register_fake
def _(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    greedy: torch.Tensor,
    repetition_penalty: torch.Tensor | None = None,
    seen_mask: torch.Tensor | None = None,
    frequency_penalty: torch.Tensor | None = None,
    presence_penalty: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
    bitmask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_penalty_inputs(logits, repetition_penalty, seen_mask, frequency_penalty, presence_penalty, output_counts)
    if bitmask is not None:
        check_bitmask(logits, bitmask)
    num_rows = logits.shape[0]
    return logits.new_empty((num_rows,), dtype=torch.int64), logits.new_empty(
        (num_rows,), dtype=torch.float32
    )
