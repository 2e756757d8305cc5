"""The Q8_0 logits head (kernels/cpu_q8_head.c): the kernel against the same arithmetic in torch,
and the embedded model's head on real hidden states against the fp32 dequantized table.

Stated tolerance, measured 2026-12-04 on the fp32 model's hidden states of the quality gate's fixed
text (54 tokens, one row at a time, logit scale 30.5): the Q8_0 head is within 0.31 logits at most
and 0.044 on average of the fp32 dequantized head (the bf16 table's head: 0.26 and 0.022), the same
argmax on all 54 rows, perplexity 57.72 against fp32's 57.63 (bf16: 57.62). The error is the
activations' 8-bit rounding; the weights are the file's codes, exact. Tolerances: ~3x and ~2x that.
"""

from __future__ import annotations

import pytest
import torch

from compiled_serve.kernels import cpu_q8_head

pytestmark = pytest.mark.skipif(not cpu_q8_head.available(), reason="no C compiler or no VNNI on this CPU")

MAX_TOL, MEAN_TOL = 1.0, 0.1  # max and mean |dlogit| against the fp32 head


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize(("n", "k"), [(1000, 576), (64, 32), (37, 1536)])
def test_matches_the_torch_arithmetic(rows: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, k // 32, generator=gen) * 0.02
    x = torch.randn(rows, k, generator=gen) * 3
    x[0, :32] = 0.0  # an all-zero block: scale 0, codes 0
    out = cpu_q8_head.q8_0_matmul(x, codes, scales)
    ref = cpu_q8_head.q8_0_matmul_reference(x, codes, scales)
    assert out is not None and out.shape == (rows, n)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    # and near the unquantized product (the activations' 8-bit rounding is the only error)
    exact = x @ (codes.float().view(n, -1, 32) * scales[:, :, None]).view(n, k).T
    assert float((out - exact).abs().max()) <= 0.02 * float(exact.abs().max())


def test_activation_quantization_matches_its_reference() -> None:
    x = torch.randn(3, 96) * torch.tensor([0.001, 1.0, 50.0])[:, None]
    q = torch.empty(3, 96, dtype=torch.int8)
    d = torch.empty(3, 3)
    cpu_q8_head._library().cs_quantize_rows_q8(x.data_ptr(), 3, 96, q.data_ptr(), d.data_ptr())
    ref_q, ref_d = cpu_q8_head.quantize_rows_reference(x)
    assert torch.equal(q, ref_q) and torch.equal(d, ref_d)


def test_declines_what_it_does_not_take() -> None:
    codes = torch.zeros(8, 64, dtype=torch.int8)
    scales = torch.ones(8, 2)
    assert cpu_q8_head.q8_0_matmul(torch.randn(cpu_q8_head.MAX_ROWS + 1, 64), codes, scales) is None
    assert cpu_q8_head.q8_0_matmul(torch.randn(1, 48), torch.zeros(8, 48, dtype=torch.int8), torch.ones(8, 1)) is None
    assert cpu_q8_head.q8_0_matmul(torch.randn(1, 64), codes, scales.double()) is None
    assert not cpu_q8_head.codes_fit(torch.full((2, 32), -128, dtype=torch.int8))
    assert cpu_q8_head.codes_fit(torch.full((2, 32), -127, dtype=torch.int8))


def test_embedded_model_head_against_the_fp32_table() -> None:
    """The GGUF loader keeps the file's Q8_0 table for the head; on real hidden states (the fp32
    model's, teacher-forced over a fixed text) one row at a time, it stays within the stated
    tolerance of the fp32 dequantized head, and picks its argmax wherever the top-2 gap is clear."""
    from compiled_serve.models.default_model import default_model_path
    from compiled_serve.models.loader import load_model
    from compiled_serve.models.loaders.gguf_quantized import load_gguf_quantized

    smollm2_gguf = default_model_path()

    text = ("The river ran quietly past the old mill, where the miller's daughter kept the accounts and "
            "fed the geese every morning before school.")
    ref_model = load_model(smollm2_gguf, dtype=torch.float32, device="cpu")
    ids = torch.tensor(ref_model.tokenizer(text).input_ids)
    with torch.inference_mode():
        hidden = ref_model.module(ids, torch.arange(len(ids)))
        ref = ref_model.module.compute_logits(hidden)
    emb = load_gguf_quantized(smollm2_gguf).module.model.embed_tokens
    assert emb.q8_table is not None
    got = torch.cat([emb.logits(hidden[i:i + 1]) for i in range(len(ids))])
    diff = (got - ref).abs()
    assert float(diff.max()) <= MAX_TOL and float(diff.mean()) <= MEAN_TOL, (float(diff.max()), float(diff.mean()))
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * MAX_TOL
    assert clear.any()
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
