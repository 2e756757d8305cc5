"""FusedSamplingPass with a grammar bitmask: the tail still becomes one fused_sample (the mask its
last argument), and the rewritten graph gives the unrewritten graph's tokens and logprobs, which
never leave the mask."""

from __future__ import annotations

import random

import pytest
import torch
from test_fused_sampling_pass import PENALTY_GROUPS, UNFUSED_OPS, compiled, tail_inputs

from compiled_serve.kernels.logits_tail import logits_tail
from compiled_serve.kernels.token_bitmask import allowed_tokens, bitmask_width
from compiled_serve.passes.base import count_ops
from compiled_serve.passes.fused_sampling import FusedSamplingPass
from compiled_serve.passes.logits_tail_pipeline import logits_tail_pass_manager


def random_bitmask(num_rows: int, vocab: int, seed: int) -> torch.Tensor:
    """int32 [N, ceil(V/32)]: rows allow a random ~10% of tokens (at least one), one row allows all."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.rand(num_rows, vocab, generator=gen) < 0.1
    allowed[torch.arange(num_rows), torch.randint(0, vocab, (num_rows,), generator=gen)] = True
    allowed[0] = True
    padded = torch.zeros(num_rows, bitmask_width(vocab) * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed.long()
    words = (padded.view(num_rows, -1, 32) << torch.arange(32)).sum(-1)  # [N, W] in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).int()


def with_mask(groups: str, num_rows: int, vocab: int, seed: int) -> tuple:
    return (*tail_inputs(num_rows, vocab, groups, seed), random_bitmask(num_rows, vocab, seed))


def test_random_bitmask_packs_what_it_allows() -> None:
    mask = random_bitmask(3, 70, seed=1)
    assert mask.shape == (3, 3) and mask.dtype == torch.int32
    assert allowed_tokens(mask, 70)[0].all() and allowed_tokens(mask, 70).sum(-1).min() >= 1


@pytest.mark.parametrize("groups", PENALTY_GROUPS)
def test_masked_tail_becomes_one_fused_sample(groups: str) -> None:
    run, graphs = compiled(logits_tail, None)
    run(*with_mask(groups, 6, 40, seed=0))
    gm = graphs[0]
    assert count_ops(gm)["compiled_serve::token_bitmask"] == 1
    assert FusedSamplingPass()(gm) == 1
    after = count_ops(gm)
    assert after.get("compiled_serve::fused_sample") == 1
    assert all(after.get(op, 0) == 0 for op in (*UNFUSED_OPS, "compiled_serve::token_bitmask")), after
    fused = next(n for n in gm.graph.nodes if n.op == "call_function" and "fused_sample" in str(n.target))
    assert fused.args[13] is not None and fused.args[13].op == "placeholder"


@pytest.mark.parametrize("groups", ["none", "both"])
def test_masked_rewritten_tail_matches_the_unrewritten_graph(groups: str) -> None:
    reference, _ = compiled(logits_tail, None)
    rewritten, graphs = compiled(logits_tail, logits_tail_pass_manager())
    rng = random.Random(groups)
    for trial in range(5):
        num_rows, vocab = (1 if trial == 0 else rng.randint(2, 16)), rng.randint(2, 300)
        inputs = with_mask(groups, num_rows, vocab, seed=trial)
        want_ids, want_logprobs = reference(*inputs)
        got_ids, got_logprobs = rewritten(*inputs)
        assert torch.equal(got_ids, want_ids), (trial, num_rows)
        torch.testing.assert_close(got_logprobs, want_logprobs, rtol=0, atol=1e-6)
        allowed = allowed_tokens(inputs[-1], vocab)
        assert allowed[torch.arange(num_rows), got_ids].all()
    assert all(count_ops(gm).get("compiled_serve::fused_sample") == 1 for gm in graphs)


def test_mask_changes_the_draw_only_where_it_must() -> None:
    """An all-ones mask is the unmasked tail exactly; a one-token mask forces that token."""
    inputs = tail_inputs(8, 100, "none", seed=3)
    ids, logprobs = logits_tail(*inputs)
    all_ones = torch.full((8, bitmask_width(100)), -1, dtype=torch.int32)
    same_ids, same_logprobs = logits_tail(*inputs, all_ones)
    assert torch.equal(ids, same_ids) and torch.equal(logprobs, same_logprobs)
    only = torch.zeros(8, bitmask_width(100), dtype=torch.int32)
    only[:, 2] = 1 << 5  # token 69
    forced, forced_logprobs = logits_tail(*inputs, only)
    assert forced.tolist() == [69] * 8 and torch.all(forced_logprobs == 0)
