"""The sampling reference against independent references: per-row numpy loops and HF's logits warpers.

What runs is what the engine runs: `TailInputs.build` (the step's one builder), its sparse edits
(logit bias, min-tokens suppression), then `logits_tail` (kernels/logits_tail.py), the one
pure-torch reference that the fused op and its Triton kernel are checked against.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from compiled_serve.engine.step_sampler import TailInputs, TailRow, raw_logprobs, wrap_int64
from compiled_serve.kernels.fused_sampling import fused_sample
from compiled_serve.kernels.logits_tail import apply_penalties, logits_tail
from compiled_serve.kernels.sampling_stages import filter_top_k_top_p_min_p
from compiled_serve.sampling_params import SamplingParams

V = 64


def make_rows(params, prompts=None, outputs=None, seeds=None, suppressed=None):
    return [
        TailRow(
            params=p,
            prompt_token_ids=list(prompts[i]) if prompts else [],
            output_token_ids=list(outputs[i]) if outputs else [],
            seed=seeds[i] if seeds else i,
            suppressed_token_ids=list(suppressed[i]) if suppressed else [],
        )
        for i, p in enumerate(params)
    ]


def build(params, vocab_size=V, device="cpu", **kwargs) -> TailInputs:
    return TailInputs.build(make_rows(params, **kwargs), vocab_size, torch.device(device))


def sample(logits: torch.Tensor, inputs: TailInputs) -> torch.Tensor:
    """token ids [N], as the engine samples them (the reference instead of the compiled tail)."""
    return logits_tail(inputs.edit_logits(logits), *inputs.args)[0]


def penalised(logits: torch.Tensor, inputs: TailInputs) -> torch.Tensor:
    """The reference's logits after the edits and the penalties: [N, V]."""
    return apply_penalties(inputs.edit_logits(logits).float(), *inputs.args[7:12])


def filtered(logits: torch.Tensor, inputs: TailInputs) -> torch.Tensor:
    """The reference's scaled, filtered logits (-inf where excluded): [N, V]."""
    temperature, top_k, top_p, min_p, _, _, greedy = inputs.args[:7]
    scaled = penalised(logits, inputs) / torch.where(greedy | (temperature <= 0), 1.0, temperature)[:, None]
    return filter_top_k_top_p_min_p(scaled, top_k, top_p, min_p)


def random_logits(n, vocab_size=V, seed=0, scale=3.0):
    return torch.randn(n, vocab_size, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------- references (per row, float64)


def ref_filtered_probs(logits_row: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Temperature -> top-k -> top-p -> min-p, written as a plain loop over one row."""
    x = logits_row.astype(np.float64) / p.temperature
    keep = np.ones(len(x), dtype=bool)
    if p.top_k >= 1:
        kth = np.sort(x)[::-1][p.top_k - 1]
        keep &= x >= kth

    def renormalized():
        e = np.where(keep, np.exp(x - x[keep].max()), 0.0)
        return e / e.sum()

    if p.top_p < 1.0:
        probs = renormalized()
        total, kept = 0.0, np.zeros_like(keep)
        for idx in sorted(np.flatnonzero(keep), key=lambda i: -x[i]):
            kept[idx] = True
            total += probs[idx]
            if total >= p.top_p:
                break
        keep = kept
    if p.min_p > 0.0:
        probs = renormalized()
        keep &= probs >= p.min_p * probs.max()
    return renormalized()


def hf_allowed(logits_row: torch.Tensor, p: SamplingParams) -> set[int]:
    scores = logits_row[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k >= 1:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        warpers.append(MinPLogitsWarper(p.min_p))
    for warper in warpers:
        scores = warper(ids, scores)
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


def ref_penalized(logits_row: np.ndarray, p: SamplingParams, prompt, output, suppressed=()) -> np.ndarray:
    x = logits_row.astype(np.float64).copy()
    for token, bias in (p.logit_bias or {}).items():
        x[token] += bias
    for token in suppressed:
        x[token] = -np.inf
    for token in set(prompt) | set(output):
        x[token] = x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
    for token in set(output):
        count = output.count(token)
        x[token] -= p.frequency_penalty * count + p.presence_penalty
    return x


def allowed_of(probs: np.ndarray) -> set[int]:
    return set(np.flatnonzero(probs > 0).tolist())


MIXED_PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(top_p=0.5, top_k=20),
    SamplingParams(min_p=0.1),
    SamplingParams(temperature=0.5, top_k=10, top_p=0.9, min_p=0.05),
    SamplingParams(top_k=-1, top_p=0.3),
    SamplingParams(temperature=2.0, min_p=0.3, top_k=40),
    SamplingParams(top_k=3, temperature=50.0),
    SamplingParams(top_p=0.999, min_p=0.01),
]


# ---------------------------------------------------------------- processing


@pytest.mark.parametrize("seed", range(5))
def test_allowed_set_matches_loop_reference_and_hf(seed):
    logits = random_logits(len(MIXED_PARAMS), seed=seed)
    processed = filtered(logits, build(MIXED_PARAMS))
    for i, p in enumerate(MIXED_PARAMS):
        ours = set(torch.isfinite(processed[i]).nonzero().flatten().tolist())
        assert ours == allowed_of(ref_filtered_probs(logits[i].numpy(), p)), (i, p)
        assert ours == hf_allowed(logits[i], p), (i, p)


def test_top_k_keeps_ties_like_hf():
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0, 0.0]])
    p = SamplingParams(top_k=2)
    processed = filtered(logits, build([p], vocab_size=6))
    assert torch.isfinite(processed[0]).nonzero().flatten().tolist() == [0, 2, 4]
    assert set(torch.isfinite(processed[0]).nonzero().flatten().tolist()) == hf_allowed(logits[0], p)


def test_extreme_filters_keep_only_the_argmax():
    logits = random_logits(3, seed=8)
    params = [SamplingParams(min_p=1.0), SamplingParams(top_p=1e-9), SamplingParams(min_p=1.0, top_p=1e-9, top_k=3)]
    processed = filtered(logits, build(params))
    for i, p in enumerate(params):
        assert torch.isfinite(processed[i]).nonzero().flatten().tolist() == [int(logits[i].argmax())]
        assert hf_allowed(logits[i], p) == {int(logits[i].argmax())}


def test_penalties_match_formulas_and_hf_repetition():
    gen = np.random.default_rng(1)
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.7, frequency_penalty=0.4, presence_penalty=-0.6),
        SamplingParams(frequency_penalty=-1.5, presence_penalty=2.0, logit_bias={3: 5.0, 60: -2.5}),
        SamplingParams(),
        SamplingParams(repetition_penalty=1.8, logit_bias={0: 100.0}, presence_penalty=0.5),
    ]
    prompts = [gen.integers(0, V, size=gen.integers(0, 30)).tolist() for _ in params]
    outputs = [gen.integers(0, V, size=gen.integers(0, 40)).tolist() for _ in params]
    suppressed = [[], [5, 6], [], [7], []]
    logits = random_logits(len(params), seed=3)
    raw = logits.clone()
    ours = penalised(logits, build(params, prompts=prompts, outputs=outputs, suppressed=suppressed))
    assert torch.equal(logits, raw), "raw logits must not be modified"
    for i, p in enumerate(params):
        ref = ref_penalized(logits[i].numpy(), p, prompts[i], outputs[i], suppressed[i])
        np.testing.assert_allclose(ours[i].double().numpy(), ref, rtol=1e-5, atol=1e-5)
        if p.repetition_penalty != 1.0 and not p.logit_bias:
            seen = torch.tensor([prompts[i] + outputs[i]])
            hf = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(seen, logits[i : i + 1].clone())
            if p.frequency_penalty == 0 and p.presence_penalty == 0 and not suppressed[i]:
                torch.testing.assert_close(ours[i], hf[0])


def test_frequency_penalty_ignores_prompt_tokens():
    p = SamplingParams(frequency_penalty=1.0, presence_penalty=1.0)
    logits = torch.zeros(1, 8)
    ours = penalised(logits, build([p], vocab_size=8, prompts=[[1, 1, 1]], outputs=[[2, 2, 3]]))
    assert ours[0].tolist() == [0.0, 0.0, -3.0, -2.0, 0.0, 0.0, 0.0, 0.0]


def test_unpenalised_batch_passes_no_penalty_tensors_and_one_copy_holds_the_rows() -> None:
    inputs = TailInputs.build([TailRow(SamplingParams(temperature=0.5, top_k=3), [1, 2], [3], seed=-5)], V,
                              torch.device("cpu"))  # fmt: skip
    temperature, top_k, top_p, min_p, seeds, offsets, greedy, *penalties, bitmask = inputs.args
    assert penalties == [None] * 5 and bitmask is None and inputs.bias_index is None and inputs.suppress_index is None
    assert temperature.tolist() == [0.5] and top_k.tolist() == [3] and top_k.dtype == torch.int32
    assert seeds.tolist() == [-5] and offsets.tolist() == [1] and greedy.tolist() == [False]
    assert temperature.untyped_storage().data_ptr() == seeds.untyped_storage().data_ptr()


def test_seeds_wrap_to_signed_int64() -> None:
    assert wrap_int64(2**63 - 1 + 1) == -(2**63)
    assert wrap_int64(-(2**63)) == -(2**63) and wrap_int64(5) == 5


def test_disabled_top_k_spellings_are_equivalent():
    logits = random_logits(2, seed=5)
    inputs = build([SamplingParams(top_k=0), SamplingParams(top_k=-1)])
    assert inputs.args[1].tolist() == [0, 0]
    assert torch.isfinite(filtered(logits, inputs)).all()


# ---------------------------------------------------------------- sampling


def test_sampled_tokens_always_allowed():
    params = MIXED_PARAMS * 4
    for step in range(30):
        logits = random_logits(len(params), seed=100 + step)
        tokens = sample(logits, build(params, seeds=[step * 1000 + i for i in range(len(params))]))
        for i, p in enumerate(params):
            allowed = allowed_of(ref_filtered_probs(logits[i].numpy(), p))
            assert int(tokens[i]) in allowed, (step, i, p)


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token outside the allowed set"
    expected = probs[support] * counts.sum()
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.8), SamplingParams(temperature=1.2, top_k=8, top_p=0.85, min_p=0.02)],
)
def test_empirical_distribution_matches_processed_softmax(params):
    vocab, draws = 16, 20000
    row = random_logits(1, vocab_size=vocab, seed=7, scale=1.5)
    logits = row.expand(draws, vocab).contiguous()
    tokens = sample(logits, build([params] * draws, vocab_size=vocab)).numpy()  # seeds 0..draws-1
    counts = np.bincount(tokens, minlength=vocab)
    stat, dof = chi_square(counts, ref_filtered_probs(row[0].numpy(), params))
    bound = dof + 6 * np.sqrt(2 * dof) + 10  # far in the tail: a correct sampler passes
    assert stat < bound, (stat, dof)
    # The test has power: the unprocessed softmax is rejected by the same statistic.
    expected = torch.softmax(row[0].double(), -1).numpy() * draws
    assert ((counts - expected) ** 2 / expected).sum() > 3 * bound


def run_steps(params_by_row, seeds, steps, seed_logits):
    """Samples `steps` steps; the logits of step s row r depend only on (s, the row's own key).

    Step s's offset is the row's output length, s, as in the engine."""
    tokens = []
    for s in range(steps):
        logits = torch.stack([random_logits(1, seed=seed_logits[r] * 1000 + s)[0] for r in range(len(params_by_row))])
        inputs = build(params_by_row, seeds=seeds, outputs=[[0] * s] * len(params_by_row))
        tokens.append(sample(logits, inputs))
    return torch.stack(tokens, dim=1)  # [N, steps]


def test_seeded_row_is_independent_of_batch_neighbours():
    target = SamplingParams(seed=1234, temperature=1.5, top_p=0.95)
    alone = run_steps([target], [1234], 25, seed_logits=[9])[0]

    neighbours = [SamplingParams(), SamplingParams(seed=7, top_k=5), SamplingParams(temperature=0.0),
                  SamplingParams(min_p=0.2)]
    params = neighbours[:2] + [target] + neighbours[2:]
    batched = run_steps(params, [11, 7, 1234, 12, 13], 25, seed_logits=[1, 2, 9, 3, 4])
    assert torch.equal(batched[2], alone)
    # Same seed, same logits, different positions in one batch: the same tokens.
    twins = run_steps([target, SamplingParams(), target], [1234, 5, 1234], 25, seed_logits=[9, 5, 9])
    assert torch.equal(twins[0], alone) and torch.equal(twins[2], alone)
    # And the draws are random at all: a different seed gives a different sequence.
    other = run_steps([target], [4321], 25, seed_logits=[9])[0]
    assert not torch.equal(other, alone)


def test_greedy_rows_take_argmax_of_penalized_logits():
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=1.0),
              SamplingParams(top_k=1, temperature=3.0), SamplingParams(temperature=0.9),
              SamplingParams(temperature=0.0, logit_bias={11: 100.0})]
    outputs = [[0, 1, 2, 2], [], [4], []]
    for seed in range(10):
        logits = random_logits(len(params), seed=seed)
        tokens = sample(logits, build(params, outputs=outputs))
        for i in (0, 1, 3):
            ref = ref_penalized(logits[i].numpy(), params[i], [], outputs[i])
            assert int(tokens[i]) == int(np.argmax(ref))
        assert int(tokens[3]) == 11
    all_greedy = [SamplingParams(temperature=0.0)] * 3
    logits = random_logits(3, seed=42)
    assert torch.equal(sample(logits, build(all_greedy)), logits.argmax(-1))


@pytest.mark.parametrize("num_logprobs", [0, 3])
def test_logprobs_from_the_fused_samplers_own_output(num_logprobs):
    """Plain rows (no penalties, bias or suppression): the sampler's logprob gives the row's
    normaliser, and every figure equals a float64 log_softmax of the logits."""
    params = [SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=0.0),
              SamplingParams(top_p=0.3, seed=4)]
    logits = random_logits(len(params), seed=12) * 3
    inputs = build(params)
    tokens, tail_logprobs = logits_tail(logits, *inputs.args)
    out = raw_logprobs(logits, tokens, num_logprobs, tail_logprobs)
    ref = logits.double().log_softmax(dim=-1)
    torch.testing.assert_close(out.logprobs.double(), ref.gather(1, tokens[:, None])[:, 0], atol=1e-5, rtol=0)
    assert out.ranks.tolist() == ((ref > ref.gather(1, tokens[:, None])).sum(-1) + 1).tolist()
    if num_logprobs:
        values, ids = ref.topk(num_logprobs, dim=-1)
        assert torch.equal(out.top_ids, ids)
        torch.testing.assert_close(out.top_values.double(), values, atol=1e-5, rtol=0)
    # The normaliser really comes from the sampler's output: shift it and every value follows.
    shifted = raw_logprobs(logits, tokens, num_logprobs, tail_logprobs - 1.0)
    torch.testing.assert_close(shifted.logprobs, out.logprobs - 1.0)
    if num_logprobs:
        torch.testing.assert_close(shifted.top_values, out.top_values - 1.0)


@pytest.mark.parametrize("num_logprobs", [0, 1, 5])
def test_logprobs_are_raw_log_softmax(num_logprobs):
    params = [SamplingParams(temperature=0.7, top_k=4, repetition_penalty=1.5, logit_bias={2: 30.0}),
              SamplingParams(temperature=0.0, presence_penalty=2.0), SamplingParams(top_p=0.2)]
    outputs = [[1, 2, 3], [5, 5], []]
    logits = random_logits(len(params), seed=11)
    inputs = build(params, outputs=outputs)
    tokens, tail_logprobs = logits_tail(inputs.edit_logits(logits), *inputs.args)
    out = raw_logprobs(logits, tokens, num_logprobs)
    for i in range(len(params)):
        x = logits[i].double().numpy()
        ref = x - (np.log(np.exp(x - x.max()).sum()) + x.max())  # log_softmax in float64
        token = int(tokens[i])
        assert float(out.logprobs[i]) == pytest.approx(ref[token], abs=1e-5)
        assert int(out.ranks[i]) == int((ref > ref[token]).sum()) + 1
        if num_logprobs:
            order = np.argsort(-ref)[:num_logprobs]
            assert out.top_ids[i].tolist() == order.tolist()
            np.testing.assert_allclose(out.top_values[i].numpy(), ref[order], atol=1e-5)
    if num_logprobs == 0:
        assert out.top_ids is None and out.top_values is None
    assert int(tokens[0]) == 2  # the +30 bias wins, though logprobs stay raw
    # The tail's own logprob is of the logits it was given (after the bias), not the raw ones.
    edited = inputs.edit_logits(logits).log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(tail_logprobs, edited)


def test_min_tokens_suppression_blocks_eos():
    eos = 5
    logits = random_logits(64, seed=2)
    logits[:, eos] = 50.0  # eos dominates every row
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)] * 32
    suppressed = [[eos, 9]] * 63 + [[]]  # the last row is past min_tokens
    tokens = sample(logits, build(params, suppressed=suppressed))
    assert not (tokens[:63] == eos).any()
    assert not (tokens[:63] == 9).any()
    assert int(tokens[63]) == eos
    # Greedy rows fall back to the best remaining token.
    second = logits.clone()
    second[:, [eos, 9]] = float("-inf")
    assert torch.equal(tokens[1:63:2], second[1:63:2].argmax(-1))


def test_logit_bias_plus_and_minus_100():
    logits = random_logits(200, seed=4)
    favourite = 17
    params = [SamplingParams(logit_bias={favourite: 100.0})] * 100 + [SamplingParams(temperature=0.0)] * 100
    # Ban every row's argmax in the greedy half.
    banned = logits[100:].argmax(-1).tolist()
    params[100:] = [SamplingParams(temperature=0.0, logit_bias={b: -100.0}) for b in banned]
    tokens = sample(logits, build(params))
    assert (tokens[:100] == favourite).all()
    for i, b in enumerate(banned):
        ref = logits[100 + i].clone()
        ref[b] -= 100.0
        assert int(tokens[100 + i]) == int(ref.argmax()) != b


@pytest.mark.gpu
def test_cuda_step_sampling_has_no_sync_and_seeded_rows_are_batch_invariant():
    """The engine's CUDA path (builder, edits, the fused op's Triton kernel, raw logprobs)."""
    device = torch.device("cuda")
    target = SamplingParams(seed=77, temperature=1.1, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.2)
    others = [SamplingParams(logit_bias={7: 3.0}), SamplingParams(temperature=0.0),
              SamplingParams(seed=5, presence_penalty=1.0)]
    vocab = 49152

    def run(params, keys, seeds):
        tokens = []
        for step in range(8):
            logits = torch.stack([torch.randn(vocab, generator=torch.Generator().manual_seed(k * 100 + step))
                                  for k in keys]).to(device) * 4
            rows = make_rows(params, outputs=[[1] * step] * len(params), suppressed=[[0]] * len(params),
                             seeds=seeds)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                inputs = TailInputs.build(rows, vocab, device)
                sampled, _ = fused_sample(inputs.edit_logits(logits), *inputs.args)
                raw_logprobs(logits, sampled, 5)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            tokens.append(sampled.cpu())
        return torch.stack(tokens, dim=1)

    alone = run([target], [9], [77])[0]
    batched = run(others[:2] + [target] + others[2:], [1, 2, 9, 3], [1, 2, 77, 5])[2]
    assert torch.equal(alone, batched)


def test_a_constrained_row_brings_a_bitmask_and_the_others_allow_everything() -> None:
    allowed = np.zeros(-(-V // 32), dtype=np.int32)
    allowed[0] = 1 << 3  # token 3 only
    rows = [TailRow(SamplingParams(), [1], [], seed=1), TailRow(SamplingParams(), [1], [], seed=2, bitmask=allowed)]
    inputs = TailInputs.build(rows, V, torch.device("cpu"))
    bitmask = inputs.args[12]
    assert bitmask.dtype == torch.int32 and bitmask.shape == (2, -(-V // 32))
    assert torch.all(bitmask[0] == -1) and bitmask[1].tolist() == allowed.tolist()
    tokens, _ = logits_tail(torch.randn(2, V), *inputs.args)
    assert tokens[1].item() == 3
