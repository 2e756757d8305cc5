"""compiled_serve::token_bitmask and fused_sample's bitmask argument: the pure-torch reference
against an explicit per-token unpacking, the Triton kernel (interpreter on the CPU) against the
reference, and the CUDA sampling path (mask kernel, then the Triton sampler) against
`logits_tail` with the same mask."""

from __future__ import annotations

import pytest
import torch

from compiled_serve.kernels.fused_sampling import fused_sample
from compiled_serve.kernels.logits_tail import logits_tail
from compiled_serve.kernels.token_bitmask import (
    allowed_tokens,
    apply_token_bitmask_reference,
    bitmask_width,
    token_bitmask,
)


def random_words(num_rows: int, vocab: int, seed: int, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**31), 2**31, (num_rows, bitmask_width(vocab)), generator=gen, dtype=torch.int64)
    words[:, 0] |= 1  # token 0 always allowed: no row is empty
    return words.int().to(device)


def settings(num_rows: int, greedy_rows: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(num_rows)
    temperature = 0.5 + torch.rand(num_rows, generator=gen)
    greedy = torch.arange(num_rows) < greedy_rows
    return (temperature, torch.zeros(num_rows, dtype=torch.int32), torch.ones(num_rows), torch.zeros(num_rows),
            torch.arange(num_rows, dtype=torch.int64) * 7919, torch.full((num_rows,), 3), greedy)


def test_allowed_tokens_reads_little_endian_bits() -> None:
    words = random_words(3, 100, seed=0)
    allowed = allowed_tokens(words, 100)
    for row in range(3):
        for token in range(100):  # the explicit definition, token by token
            bit = (int(words[row, token // 32]) >> (token % 32)) & 1
            assert bool(allowed[row, token]) == bool(bit)


def test_reference_masks_to_minus_infinity_and_keeps_the_rest() -> None:
    logits = torch.randn(4, 70, dtype=torch.bfloat16)
    words = random_words(4, 70, seed=1)
    masked = token_bitmask(logits, words)
    allowed = allowed_tokens(words, 70)
    assert masked.dtype == torch.float32
    assert torch.equal(masked[allowed], logits.float()[allowed]) and torch.all(masked[~allowed] == float("-inf"))
    torch.library.opcheck(token_bitmask, (logits.float(), words))


def test_bad_bitmask_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="int32"):
        token_bitmask(torch.zeros(2, 64), torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        token_bitmask(torch.zeros(2, 64), torch.zeros(2, 2, dtype=torch.int64))


@pytest.mark.parametrize(("vocab", "block"), [(70, 32), (300, 128), (1000, 1024)])
def test_triton_bitmask_matches_the_reference(vocab: int, block: int, triton_device: str) -> None:
    from compiled_serve.kernels.triton_token_bitmask import apply_token_bitmask_triton

    logits = torch.randn(5, vocab).to(triton_device)
    words = random_words(5, vocab, seed=vocab, device=triton_device)
    got = apply_token_bitmask_triton(logits, words, block=block)
    assert torch.equal(got.cpu(), apply_token_bitmask_reference(logits, words).cpu())


def test_cuda_sampling_path_with_a_mask_matches_logits_tail(triton_device: str) -> None:
    """What fused_sample runs on CUDA with a bitmask: the mask kernel, then the Triton sampler."""
    from compiled_serve.kernels.triton_sampler import fused_sample_triton
    from compiled_serve.kernels.triton_token_bitmask import apply_token_bitmask_triton

    logits = (torch.randn(6, 200) * 3).to(triton_device)
    words = random_words(6, 200, seed=2, device=triton_device)
    args = tuple(t.to(triton_device) for t in settings(6, greedy_rows=2))
    got_ids, got_lp = fused_sample_triton(apply_token_bitmask_triton(logits, words), *args)
    want_ids, want_lp = logits_tail(logits, *args, None, None, None, None, None, words)
    assert torch.equal(got_ids.cpu(), want_ids.cpu())
    torch.testing.assert_close(got_lp.cpu(), want_lp.cpu(), rtol=0, atol=1e-5)
    assert allowed_tokens(words, 200)[torch.arange(6), got_ids.cpu()].all()


def test_fused_sample_with_a_mask_passes_opcheck_and_never_leaves_it() -> None:
    logits = torch.randn(8, 90) * 4
    words = random_words(8, 90, seed=3)
    args = settings(8, greedy_rows=3)
    torch.library.opcheck(fused_sample, (logits, *args), {"bitmask": words})
    ids, _ = fused_sample(logits, *args, bitmask=words)
    assert allowed_tokens(words, 90)[torch.arange(8), ids].all()
