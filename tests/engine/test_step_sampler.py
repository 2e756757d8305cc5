"""The engine's per-step sampling inputs against the pure-torch sampler's `SamplingBatch` and `sample`."""

from __future__ import annotations

import torch

from compiled_serve.engine.sampler import (
    SamplingBatch,
    SamplingRow,
    apply_penalties,
    apply_top_k_top_p_min_p,
    sample,
)
from compiled_serve.engine.step_sampler import TailInputs, TailRow, raw_logprobs, wrap_int64
from compiled_serve.passes.logits_tail_pipeline import compile_logits_tail
from compiled_serve.sampling_params import SamplingParams

VOCAB = 64
PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=1.8, logit_bias={3: 5.0}),
    SamplingParams(temperature=0.0, frequency_penalty=1.0, presence_penalty=0.5, min_tokens=5),
    SamplingParams(temperature=0.8, top_k=5, seed=7),
    SamplingParams(temperature=1.2, top_p=0.7, repetition_penalty=1.3),
    SamplingParams(temperature=1.0, min_p=0.1, frequency_penalty=-0.5, logit_bias={10: -3.0, 11: 2.0}),
]


def _rows() -> tuple[list[TailRow], list[SamplingRow]]:
    gen = torch.Generator().manual_seed(0)
    tail_rows, sampler_rows = [], []
    for i, params in enumerate(PARAMS):
        prompt = torch.randint(0, VOCAB, (7,), generator=gen).tolist()
        output = torch.randint(0, VOCAB, (i,), generator=gen).tolist()
        suppressed = [VOCAB - 1] if len(output) < params.min_tokens else []
        tail_rows.append(TailRow(params, prompt, output, seed=wrap_int64(1000 + i), suppressed_token_ids=suppressed))
        sampler_rows.append(SamplingRow(params, prompt, output, suppressed_token_ids=suppressed))
    return tail_rows, sampler_rows


def test_tail_samples_what_the_reference_sampler_allows() -> None:
    """Greedy rows: the reference sampler's token; sampled rows: a token its filter keeps."""
    tail_rows, sampler_rows = _rows()
    logits = torch.randn(len(PARAMS), VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    raw = logits.clone()
    inputs = TailInputs.build(tail_rows, VOCAB, torch.device("cpu"))
    tail, _ = compile_logits_tail("graph")
    token_ids, _ = tail(inputs.edit_logits(logits), *inputs.args)
    assert torch.equal(logits, raw)  # the edits went to a copy

    batch = SamplingBatch.build(sampler_rows, VOCAB, "cpu")
    reference = sample(logits, batch, num_logprobs=0)
    greedy = batch.greedy
    assert torch.equal(token_ids[greedy], reference.token_ids[greedy])
    processed = apply_penalties(logits, batch)
    filtered = apply_top_k_top_p_min_p(processed / batch.temperature[:, None], batch)
    assert filtered.isfinite().gather(1, token_ids[:, None]).all()
    assert (token_ids[2] != VOCAB - 1) and filtered[2, VOCAB - 1] == float("-inf")  # min_tokens suppression

    # Same seeds and offsets: the same tokens again; raw logprobs are the reference's.
    again, _ = tail(inputs.edit_logits(logits), *inputs.args)
    assert torch.equal(again, token_ids)
    out = raw_logprobs(logits, reference.token_ids, num_logprobs=3)
    torch.testing.assert_close(out.logprobs, reference.logprobs)
    assert torch.equal(out.ranks, reference.ranks)


def test_unpenalised_batch_passes_no_penalty_tensors_and_one_copy_holds_the_rows() -> None:
    rows = [TailRow(SamplingParams(temperature=0.5, top_k=3), [1, 2], [3], seed=-5)]
    inputs = TailInputs.build(rows, VOCAB, torch.device("cpu"))
    temperature, top_k, top_p, min_p, seeds, offsets, greedy, *penalties = inputs.args
    assert penalties == [None] * 5 and inputs.bias_index is None and inputs.suppress_index is None
    assert temperature.tolist() == [0.5] and top_k.tolist() == [3] and top_k.dtype == torch.int32
    assert seeds.tolist() == [-5] and offsets.tolist() == [1] and greedy.tolist() == [False]
    assert temperature.untyped_storage().data_ptr() == seeds.untyped_storage().data_ptr()


def test_seeds_wrap_to_signed_int64() -> None:
    assert wrap_int64(2**63 - 1 + 1) == -(2**63)
    assert wrap_int64(-(2**63)) == -(2**63) and wrap_int64(5) == 5
