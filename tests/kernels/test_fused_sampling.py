"""Fused sampling op: the Triton kernel against the pure-torch reference (`logits_tail`) and its filter.

On the CPU the kernel runs in the Triton interpreter, which is slow per program, so the rows are
few and small; statistics over many draws are taken from the reference, which the kernel matches
token for token (same Philox bits). The @gpu tests repeat the checks at vocab 151936 in bf16.
"""

from __future__ import annotations

import pytest
import torch

from compiled_serve.kernels.fused_sampling import fused_sample
from compiled_serve.kernels.logits_tail import apply_penalties, logits_tail
from compiled_serve.kernels.philox import philox_uint32
from compiled_serve.kernels.sampling_stages import filter_top_k_top_p_min_p

Settings = tuple[torch.Tensor, ...]  # temperature, top_k, top_p, min_p, seeds, offsets, greedy
# repetition_penalty, seen_mask, frequency_penalty, presence_penalty, output_counts (or all None)
Penalties = tuple[torch.Tensor | None, ...]
NO_PENALTIES: Penalties = (None,) * 5


def _random_settings(num_rows: int, vocab: int, seed: int, device: str = "cpu") -> Settings:
    """Per-row settings covering each filter alone, all together, greedy and top_k = 1."""
    gen = torch.Generator().manual_seed(seed)
    temperature = 0.3 + 1.5 * torch.rand(num_rows, generator=gen)
    top_k = torch.randint(1, 60, (num_rows,), generator=gen, dtype=torch.int32)
    top_k = torch.where(torch.rand(num_rows, generator=gen) < 0.4, 0, top_k)  # 0 = off
    top_p = torch.where(
        torch.rand(num_rows, generator=gen) < 0.5, 1.0, 0.3 + 0.65 * torch.rand(num_rows, generator=gen)
    )
    min_p = torch.where(
        torch.rand(num_rows, generator=gen) < 0.6, 0.0, 0.2 * torch.rand(num_rows, generator=gen)
    )
    greedy = torch.rand(num_rows, generator=gen) < 0.15
    seeds = torch.randint(-(2**62), 2**62, (num_rows,), generator=gen)
    offsets = torch.randint(0, 2**40, (num_rows,), generator=gen)
    settings = (temperature, top_k, top_p, min_p, seeds, offsets, greedy)
    return tuple(t.to(device) for t in settings)


def _random_penalties(num_rows: int, vocab: int, seed: int, device: str = "cpu") -> Penalties:
    """Dense penalty inputs: some rows neutral (1.0 / 0.0), the rest pushing either way."""
    gen = torch.Generator().manual_seed(seed)
    neutral = torch.rand(num_rows, generator=gen) < 0.3
    repetition = torch.where(neutral, 1.0, 0.5 + 1.5 * torch.rand(num_rows, generator=gen))
    seen = torch.rand(num_rows, vocab, generator=gen) < 0.3
    frequency = torch.where(neutral, 0.0, 2 * torch.rand(num_rows, generator=gen) - 1)
    presence = torch.where(neutral, 0.0, 2 * torch.rand(num_rows, generator=gen) - 1)
    counts = torch.randint(0, 4, (num_rows, vocab), generator=gen).float() * (torch.rand(num_rows, vocab, generator=gen) < 0.2)
    return tuple(t.to(device) for t in (repetition, seen, frequency, presence, counts))


def _penalised(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """The reference's penalties on the dense inputs: [N, V] float32."""
    return apply_penalties(logits.float(), *penalties)


def _filtered(logits: torch.Tensor, settings: Settings) -> torch.Tensor:
    """The reference's temperature and filter: [N, V] scaled logits, -inf where excluded."""
    temperature, top_k, top_p, min_p, _, _, greedy = settings
    greedy = greedy | (temperature <= 0)
    scaled = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]
    return filter_top_k_top_p_min_p(scaled, top_k, top_p, min_p)


def _random_logits(num_rows: int, vocab: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_rows, vocab, generator=gen) * 3.0).to(dtype)  # [N, V]


def _allowed(logits: torch.Tensor, settings: Settings) -> torch.Tensor:
    """[N, V] bool: tokens the reference filter keeps, plus ties with its least kept value.

    Ties only matter for low-precision logits (the kernel keeps every tie at the top-p boundary,
    the sort-based filter an arbitrary subset); random fp32 rows have none.
    """
    temperature, greedy = settings[0], settings[-1]
    filtered = _filtered(logits, settings)  # [N, V]
    scaled = logits.float() / torch.where(greedy | (temperature <= 0), 1.0, temperature)[:, None]
    least_kept = filtered.masked_fill(filtered.isinf(), float("inf")).amin(dim=-1, keepdim=True)
    return scaled >= least_kept


def _check_rows(
    logits: torch.Tensor, settings: Settings, token_ids: torch.Tensor, logprobs: torch.Tensor,
    penalties: Penalties = NO_PENALTIES,
) -> None:  # fmt: skip
    """(1) greedy rows take the penalised argmax, (2) sampled tokens are allowed after the
    penalties, (3) logprobs are those of the raw (unpenalised) logits."""
    greedy = settings[-1]
    penalised = _penalised(logits, penalties)
    argmax = penalised.argmax(dim=-1)
    assert torch.equal(token_ids[greedy], argmax[greedy])
    assert _allowed(penalised, settings).gather(1, token_ids[:, None]).all()
    expected = logits.float().log_softmax(dim=-1).gather(1, token_ids[:, None])[:, 0]
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=0)


def _tv_distance(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Total variation between the empirical distribution of `tokens` and `probs` [V]."""
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    return 0.5 * float((counts / counts.sum() - probs.double().cpu()).abs().sum())


def test_reference_philox_matches_triton(triton_device: str) -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def philox_kernel(out_ptr, seed_ptr, offset_ptr, VOCAB: tl.constexpr):
        seed, offset = tl.load(seed_ptr), tl.load(offset_ptr)
        c0 = tl.arange(0, VOCAB).to(tl.uint32)
        zero = c0 * 0
        bits, _, _, _ = tl.philox_impl(
            c0, zero + offset.to(tl.uint32), zero + (offset >> 32).to(tl.uint32), zero,
            seed.to(tl.uint32), (seed >> 32).to(tl.uint32),
        )  # fmt: skip
        tl.store(out_ptr + tl.arange(0, VOCAB), bits.to(tl.int64))

    for seed, offset in [(0, 0), (12345, 7), (-5, 2**40 + 3), (2**62 + 11, 2**33)]:
        out = torch.empty(64, dtype=torch.int64, device=triton_device)
        as_tensor = lambda v: torch.tensor([v], device=triton_device)  # noqa: E731
        philox_kernel[(1,)](out, as_tensor(seed), as_tensor(offset), VOCAB=64)
        assert torch.equal(out, philox_uint32(as_tensor(seed), as_tensor(offset), 64)[0])


def test_custom_op_passes_opcheck() -> None:
    logits = _random_logits(4, 40, seed=0)
    settings = _random_settings(4, 40, seed=0)
    torch.library.opcheck(fused_sample, (logits, *settings))
    token_ids, logprobs = fused_sample(logits, *settings)
    assert token_ids.dtype == torch.int64 and logprobs.dtype == torch.float32
    _check_rows(logits, settings, token_ids, logprobs)


@pytest.mark.parametrize(("vocab", "block"), [(300, 64), (512, None)])
def test_kernel_matches_reference_and_filter(vocab: int, block: int | None, triton_device: str) -> None:
    from compiled_serve.kernels.triton_sampler import fused_sample_triton

    logits = _random_logits(8, vocab, seed=vocab).to(triton_device)
    settings = _random_settings(8, vocab, seed=vocab, device=triton_device)
    token_ids, logprobs = fused_sample_triton(logits, *settings, block=block)
    _check_rows(logits, settings, token_ids, logprobs)
    ref_ids, ref_logprobs = logits_tail(logits, *settings)
    assert torch.equal(token_ids, ref_ids)  # same Philox bits; near-ties are vanishingly rare


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p"), [(9, 1.0, 0.0), (0, 0.4, 0.0), (0, 1.0, 0.8), (12, 0.7, 0.5)]
)
def test_kernel_respects_each_filter_on_flat_rows(
    top_k: int, top_p: float, min_p: float, triton_device: str
) -> None:
    """Near-flat rows: each filter drops about half the mass, so a filter that let excluded
    tokens through would show up in some of the 24 draws (chance of missing it ~2^-24)."""
    from compiled_serve.kernels.triton_sampler import fused_sample_triton

    rows, vocab = 24, 32
    logits = (0.3 * _random_logits(rows, vocab, seed=top_k + 13) / 3.0).to(triton_device)
    full = lambda v, dtype=torch.float32: torch.full((rows,), v, dtype=dtype, device=triton_device)  # noqa: E731
    settings = (full(1.0), full(top_k, torch.int32), full(top_p), full(min_p), full(21, torch.int64),
                torch.arange(rows, device=triton_device), full(0, torch.bool))  # fmt: skip
    assert _allowed(logits, settings).float().mean() < 0.6  # the filters do bite
    token_ids, logprobs = fused_sample_triton(logits, *settings)
    _check_rows(logits, settings, token_ids, logprobs)


@pytest.mark.parametrize("groups", ["repetition", "frequency", "both"])
def test_kernel_applies_penalties_like_the_reference(groups: str, triton_device: str) -> None:
    """Penalised rows (block < vocab, so the scratch row spans tiles), greedy and sampled."""
    from compiled_serve.kernels.triton_sampler import fused_sample_triton

    vocab = 200
    logits = _random_logits(8, vocab, seed=20).to(triton_device)
    settings = _random_settings(8, vocab, seed=20, device=triton_device)
    penalties = list(_random_penalties(8, vocab, seed=20, device=triton_device))
    if groups == "frequency":
        penalties[:2] = [None, None]
    if groups == "repetition":
        penalties[2:] = [None, None, None]
    token_ids, logprobs = fused_sample_triton(logits, *settings, *penalties, block=64)
    _check_rows(logits, settings, token_ids, logprobs, tuple(penalties))
    ref_ids, ref_logprobs = logits_tail(logits, *settings, *penalties)
    assert torch.equal(token_ids, ref_ids)
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-5, rtol=0)


def test_penalties_change_the_draw_and_greedy_follows_them() -> None:
    """A heavily penalised argmax is never the greedy token; raw logprobs ignore the penalty."""
    logits = _random_logits(6, 50, seed=21)
    settings = list(_random_settings(6, 50, seed=21))
    settings[-1] = torch.ones(6, dtype=torch.bool)  # all greedy
    seen = torch.zeros(6, 50, dtype=torch.bool).scatter_(1, logits.argmax(-1, keepdim=True), True)
    penalties = (torch.full((6,), 1e6), seen, None, None, None)
    token_ids, logprobs = fused_sample(logits, *settings, *penalties)
    assert not (token_ids == logits.argmax(-1)).any()
    _check_rows(logits, tuple(settings), token_ids, logprobs, penalties)


def test_penalty_groups_must_be_whole_and_shaped() -> None:
    logits = _random_logits(3, 40, seed=22)
    settings = _random_settings(3, 40, seed=22)
    repetition, seen, frequency, presence, counts = _random_penalties(3, 40, seed=22)
    with pytest.raises(ValueError, match="seen_mask"):
        fused_sample(logits, *settings, repetition, None, None, None, None)
    with pytest.raises(ValueError, match="output_counts"):
        fused_sample(logits, *settings, None, None, frequency, presence, None)
    with pytest.raises(ValueError, match=r"counts has shape \(3, 39\)"):
        fused_sample(logits, *settings, None, None, frequency, presence, counts[:, :39])


def test_custom_op_with_penalties_passes_opcheck() -> None:
    logits = _random_logits(4, 40, seed=23)
    settings = _random_settings(4, 40, seed=23)
    penalties = _random_penalties(4, 40, seed=23)
    torch.library.opcheck(fused_sample, (logits, *settings, *penalties))
    _check_rows(logits, settings, *fused_sample(logits, *settings, *penalties), penalties)


def test_reference_samples_lie_in_the_filtered_set() -> None:
    logits = _random_logits(256, 200, seed=3)
    settings = _random_settings(256, 200, seed=3)
    _check_rows(logits, settings, *logits_tail(logits, *settings))


def test_row_draw_depends_only_on_its_seed_and_offset(triton_device: str) -> None:
    from compiled_serve.kernels.triton_sampler import fused_sample_triton

    vocab = 128
    logits = _random_logits(6, vocab, seed=4).to(triton_device)
    a = _random_settings(6, vocab, seed=5, device=triton_device)
    b = _random_settings(6, vocab, seed=6, device=triton_device)
    # Row 0 is fixed; its neighbours change logits, settings, seeds and offsets.
    b = tuple(torch.cat([x[:1], y[1:]]) for x, y in zip(a, b))
    other_logits = torch.cat([logits[:1], _random_logits(5, vocab, seed=7).to(triton_device)])
    first = fused_sample_triton(logits, *a)[0]
    second = fused_sample_triton(other_logits, *b)[0]
    alone = fused_sample_triton(logits[:1], *(t[:1] for t in a))[0]
    assert first[0] == second[0] == alone[0]


def test_different_offsets_give_different_draws(triton_device: str) -> None:
    from compiled_serve.kernels.triton_sampler import fused_sample_triton

    steps, vocab = 12, 64
    logits = torch.zeros(steps, vocab, device=triton_device)  # uniform: draws are all noise
    settings = _random_settings(steps, vocab, seed=8, device=triton_device)
    temperature, top_k, top_p, min_p = (
        torch.full_like(t, v) for t, v in zip(settings[:4], (1.0, 0, 1.0, 0.0))
    )
    seeds = torch.full((steps,), 1234, device=triton_device)
    offsets = torch.arange(steps, device=triton_device)
    greedy = torch.zeros(steps, dtype=torch.bool, device=triton_device)
    tokens = fused_sample_triton(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy)[0]
    assert tokens.unique().numel() >= steps - 3  # 12 uniform draws from 64 rarely collide more
    again = fused_sample_triton(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy)[0]
    assert torch.equal(tokens, again)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p"),
    [(1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 6, 0.9, 0.05)],
)
def test_draws_over_offsets_follow_the_filtered_softmax(
    temperature: float, top_k: int, top_p: float, min_p: float, triton_device: str
) -> None:
    """(5): 20000 reference draws (fast), and the kernel equal to them on the first 32 offsets."""
    from compiled_serve.kernels.triton_sampler import fused_sample_triton

    steps = 20000
    row = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -4.0])
    settings = (
        torch.full((steps,), temperature), torch.full((steps,), top_k, dtype=torch.int32),
        torch.full((steps,), top_p), torch.full((steps,), min_p), torch.full((steps,), 99),
        torch.arange(steps), torch.zeros(steps, dtype=torch.bool),
    )  # fmt: skip
    logits = row.expand(steps, -1)
    expected = _filtered(logits[:1], tuple(t[:1] for t in settings))[0].softmax(-1)
    tokens = logits_tail(logits, *settings)[0]
    assert _tv_distance(tokens, expected) < 0.02  # deterministic draws; typical distance ~0.005
    assert (expected[tokens] > 0).all()
    head = 32
    kernel_tokens = fused_sample_triton(
        logits[:head].contiguous().to(triton_device), *(t[:head].to(triton_device) for t in settings)
    )[0]
    assert torch.equal(kernel_tokens.cpu(), tokens[:head])


def test_top_k_one_is_greedy(triton_device: str) -> None:
    from compiled_serve.kernels.triton_sampler import fused_sample_triton

    logits = _random_logits(6, 256, seed=9).to(triton_device)
    temperature, _, top_p, min_p, seeds, offsets, _ = _random_settings(6, 256, seed=9, device=triton_device)
    top_k = torch.ones(6, dtype=torch.int32, device=triton_device)
    greedy = torch.zeros(6, dtype=torch.bool, device=triton_device)
    token_ids, _ = fused_sample_triton(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy)
    assert torch.equal(token_ids, logits.argmax(dim=-1))


# ---------------------------------------------------------------------------------------------
# CUDA: the compiled kernel at a real vocabulary (Qwen2's 151936) with bf16 logits.

GPU_VOCAB = 151936


@pytest.mark.gpu
def test_gpu_kernel_matches_filter_and_reference(cuda_device: str) -> None:
    logits = _random_logits(64, GPU_VOCAB, seed=10, dtype=torch.bfloat16).to(cuda_device)
    settings = _random_settings(64, GPU_VOCAB, seed=10, device=cuda_device)
    token_ids, logprobs = fused_sample(logits, *settings)  # dispatches to the Triton kernel
    _check_rows(logits, settings, token_ids, logprobs)
    ref_ids = logits_tail(logits, *settings)[0]
    # bf16 rows tie often: the kernel keeps all ties at the top-p boundary, so allow a few misses.
    assert (token_ids == ref_ids).float().mean() >= 0.9


@pytest.mark.gpu
def test_gpu_kernel_with_penalties_matches_filter_and_reference(cuda_device: str) -> None:
    logits = _random_logits(32, GPU_VOCAB, seed=13, dtype=torch.bfloat16).to(cuda_device)
    settings = _random_settings(32, GPU_VOCAB, seed=13, device=cuda_device)
    penalties = _random_penalties(32, GPU_VOCAB, seed=13, device=cuda_device)
    token_ids, logprobs = fused_sample(logits, *settings, *penalties)
    _check_rows(logits, settings, token_ids, logprobs, penalties)
    ref_ids = logits_tail(logits, *settings, *penalties)[0]
    assert (token_ids == ref_ids).float().mean() >= 0.9  # bf16 ties at the top-p boundary


@pytest.mark.gpu
def test_gpu_draws_are_batch_independent_and_top_k_one_is_greedy(cuda_device: str) -> None:
    logits = _random_logits(16, GPU_VOCAB, seed=11, dtype=torch.bfloat16).to(cuda_device)
    settings = _random_settings(16, GPU_VOCAB, seed=11, device=cuda_device)
    full = fused_sample(logits, *settings)[0]
    for i in (0, 7, 15):
        assert full[i] == fused_sample(logits[i : i + 1], *(t[i : i + 1] for t in settings))[0][0]
    top_k_one = (*settings[:1], torch.ones_like(settings[1]), *settings[2:6], torch.zeros_like(settings[6]))
    picked = fused_sample(logits, *top_k_one)[0]
    # top_k = 1 keeps every token tied with the maximum (bf16 rows of 150k tokens tie often).
    row_max = logits.float().amax(dim=-1)
    assert torch.equal(logits.float().gather(1, picked[:, None])[:, 0], row_max)


@pytest.mark.gpu
def test_gpu_draws_over_offsets_follow_the_filtered_softmax(cuda_device: str) -> None:
    steps = 4096
    gen = torch.Generator().manual_seed(12)
    row = (torch.randn(GPU_VOCAB, generator=gen) * 2.0).to(torch.bfloat16)
    row[:8] = torch.tensor([12.0, 11.5, 11.0, 10.8, 10.0, 9.0, 8.0, 7.0])  # a peaked head
    logits = row.to(cuda_device).expand(steps, -1)
    full = lambda v, dtype=torch.float32: torch.full((steps,), v, dtype=dtype, device=cuda_device)  # noqa: E731
    settings = (full(1.0), full(6, torch.int32), full(0.95), full(0.0), full(5, torch.int64),
                torch.arange(steps, device=cuda_device), full(0, torch.bool))  # fmt: skip
    expected = _filtered(logits[:1], tuple(t[:1] for t in settings))[0].softmax(-1)
    tokens = fused_sample(logits, *settings)[0]
    assert _tv_distance(tokens, expected) < 0.05
    assert (expected[tokens] > 0).all()


@pytest.mark.parametrize("with_penalties", [False, True])
@pytest.mark.parametrize("with_bitmask", [False, True])
def test_all_greedy_cpu_shortcut_equals_the_full_tail(with_penalties: bool, with_bitmask: bool) -> None:
    """The CPU op's all-greedy shortcut (`greedy_tail`) returns the full reference's bits: token ids
    and logprobs, rows greedy by flag or by temperature <= 0, with penalties and a grammar mask."""
    from compiled_serve.kernels.logits_tail import greedy_tail
    from compiled_serve.kernels.token_bitmask import bitmask_width

    logits = _random_logits(7, 300, seed=5)
    settings = list(_random_settings(7, 300, seed=5))
    settings[0] = torch.where(torch.arange(7) % 2 == 0, 0.0, settings[0])  # temperature <= 0: greedy
    settings[-1] = torch.arange(7) % 2 == 1  # the other rows greedy by flag
    penalties = _random_penalties(7, 300, seed=5) if with_penalties else NO_PENALTIES
    bitmask = None
    if with_bitmask:
        gen = torch.Generator().manual_seed(5)
        bitmask = torch.randint(-(2**31), 2**31 - 1, (7, bitmask_width(300)), generator=gen, dtype=torch.int32)
    ref = logits_tail(logits, *settings, *penalties, bitmask)
    assert all(torch.equal(a, b) for a, b in zip(greedy_tail(logits, *penalties, bitmask), ref))
    op = fused_sample(logits, *settings, *penalties, bitmask)
    assert all(torch.equal(a, b) for a, b in zip(op, ref))
    settings[-1] = torch.zeros(7, dtype=torch.bool)  # odd rows now sample: the op takes the full tail
    settings[0] = torch.where(torch.arange(7) % 2 == 0, 0.0, 0.8)
    ref = logits_tail(logits, *settings, *penalties, bitmask)
    assert all(torch.equal(a, b) for a, b in zip(fused_sample(logits, *settings, *penalties, bitmask), ref))
