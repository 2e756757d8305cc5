"""GGUF blocks repacked into the quantized layouts: exact on real blocks of the embedded model,
and the quantized engine model's greedy tokens against transformers on the dequantized weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from compiled_serve.models.loaders.gguf_quantized import (
    load_gguf_quantized,
    quantized_from_parts,
    repack_blocks,
)
from compiled_serve.models.loaders.gguf_reader import GGUFFile


def blockwise(parts: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return parts[name].repeat_interleave(32, dim=1)


def real_tensor(path: str, name: str) -> Any:
    return next(t for t in GGUFFile(path).tensors if t.name == name)


def test_q4_1_blocks_of_the_embedded_model_repack_exactly(smollm2_gguf: str) -> None:
    tensor = real_tensor(smollm2_gguf, "blk.3.ffn_down.weight")
    assert tensor.tensor_type.name == "Q4_1"
    rows, cols = int(tensor.shape[1]), int(tensor.shape[0])
    parts = repack_blocks("Q4_1", tensor.data, (rows, cols))
    ref = torch.from_numpy(gguf_dequantize(tensor.data, tensor.tensor_type).reshape(rows, cols))
    assert parts["codes"].dtype == torch.uint8 and int(parts["codes"].max()) <= 15
    assert torch.equal(parts["codes"].float() * blockwise(parts, "scales") + blockwise(parts, "mins"), ref)
    # In torch's int4 layout with float32 scales: the same codes; zero = min + 8 * scale rounds once.
    qw = quantized_from_parts(parts, "int4", torch.float32)
    assert torch.allclose(qw.dequantize(), ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


def test_q8_0_embedding_blocks_repack_exactly(smollm2_gguf: str) -> None:
    tensor = real_tensor(smollm2_gguf, "token_embd.weight")
    assert tensor.tensor_type.name == "Q8_0"
    cols = int(tensor.shape[0])
    data = tensor.data[:256]  # 256 vocabulary rows are plenty
    parts = repack_blocks("Q8_0", data, (256, cols))
    ref = torch.from_numpy(gguf_dequantize(data, tensor.tensor_type).reshape(256, cols))
    assert torch.equal(quantized_from_parts(parts, "q8b", torch.float32).dequantize(), ref)


def test_q4_0_blocks_repack_exactly() -> None:
    # The embedded model has no Q4_0 tensor: quantize one with gguf-py itself.
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    data = gguf_quantize(w, GGMLQuantizationType.Q4_0)
    ref = torch.from_numpy(gguf_dequantize(data, GGMLQuantizationType.Q4_0).reshape(64, 256))
    parts = repack_blocks("Q4_0", data, (64, 256))
    assert torch.equal(parts["codes"].float() * blockwise(parts, "scales") + blockwise(parts, "mins"), ref)
    assert torch.equal(quantized_from_parts(parts, "int4", torch.float32).dequantize(), ref)


def test_a_type_without_a_repacking_is_refused() -> None:
    from compiled_serve.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="cannot be repacked"):
        repack_blocks("Q6_K", np.zeros((1, 210), np.uint8), (1, 256))


@pytest.fixture(scope="module")
def int4_smollm2(smollm2_gguf: str) -> Any:
    return load_gguf_quantized(smollm2_gguf, "int4", torch.float32, head_dtype=None)  # exact: fp32 scales and head


def test_int4_model_holds_the_files_weights(int4_smollm2: Any, our_smollm2: Any) -> None:
    ours = dict(our_smollm2.module.named_parameters())
    quantized = 0
    for name, p in int4_smollm2.module.named_parameters():
        qw = getattr(p, "quantized_weight", None)
        if qw is None:
            assert torch.equal(p, ours[name]), name
            continue
        quantized += 1
        assert torch.allclose(qw.dequantize(), ours[name], rtol=0, atol=1e-6), name
    assert quantized == 4 * 30  # qkv, o, gate_up, down in each of the 30 layers


def test_the_default_head_is_the_files_embedding_in_bf16(smollm2_gguf: str, our_smollm2: Any) -> None:
    """The tied embedding (the logits head) is stored in bf16; looked-up rows come back float32."""
    loaded = load_gguf_quantized(smollm2_gguf, "int4")
    emb = loaded.module.model.embed_tokens
    ref = our_smollm2.module.model.embed_tokens.weight
    assert emb.weight.dtype == torch.bfloat16 and torch.equal(emb.weight, ref.bfloat16())
    ids = torch.tensor([0, 17, 49151])
    assert emb(ids).dtype == torch.float32 and torch.equal(emb(ids), ref.bfloat16().float()[ids])
    hidden = torch.randn(8, ref.shape[1])  # past cpu_q8_head.MAX_ROWS: the bf16 table's head
    logits = loaded.module.compute_logits(hidden)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hidden @ ref.t(), rtol=0.02, atol=0.05)


def test_few_rows_take_the_files_q8_0_table_where_the_cpu_kernel_runs(smollm2_gguf: str, our_smollm2: Any) -> None:
    """Up to cpu_q8_head.MAX_ROWS rows the head runs on the file's own Q8_0 blocks (the same codes and
    scales the fp32 reference dequantized), within the activations' 8-bit rounding of the fp32 head."""
    from compiled_serve.kernels import cpu_q8_head

    loaded = load_gguf_quantized(smollm2_gguf, "int4")
    emb = loaded.module.model.embed_tokens
    if not cpu_q8_head.available():
        assert emb.q8_table is None
        pytest.skip("no C compiler or no VNNI on this CPU")
    ref = our_smollm2.module.model.embed_tokens.weight
    codes, scales = emb.q8_table
    assert torch.equal((codes.float().view(codes.shape[0], -1, 32) * scales[:, :, None]).view(codes.shape), ref)
    hidden = torch.randn(cpu_q8_head.MAX_ROWS, ref.shape[1])
    logits = loaded.module.compute_logits(hidden)
    exact = hidden @ ref.t()
    assert torch.equal(logits, cpu_q8_head.q8_0_matmul(hidden, codes, scales))
    assert float((logits - exact).abs().max()) <= 0.02 * float(exact.abs().max())


@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_the_packed_bf16_head_gives_the_plain_bf16_products(rows: int) -> None:
    """The oneDNN-packed table (models/quantized.py) against F.linear on the same bf16 table and
    against float64 on the bf16 values: the same products up to the accumulation order."""
    from compiled_serve.models.quantized import CastingEmbedding, packed_bf16_linear_available

    gen = torch.Generator().manual_seed(rows)
    table = (torch.randn(1000, 64, generator=gen) * 0.05).to(torch.bfloat16)
    emb = CastingEmbedding(table, torch.float32)
    hidden = torch.randn(rows, 64, generator=gen)
    got = emb.logits(hidden)
    assert got.dtype == torch.float32 and got.shape == (rows, 1000)
    assert (emb._packed is not None) == packed_bf16_linear_available()
    exact = hidden.bfloat16().double() @ table.double().t()
    plain = torch.nn.functional.linear(hidden.bfloat16(), table).float()
    tol = 2.0 ** -7 * float(exact.abs().max())  # one bf16 rounding of the output
    assert float((got.double() - exact).abs().max()) <= tol
    assert float((got - plain).abs().max()) <= tol
    emb.weight = torch.nn.Parameter(table.flip(0), requires_grad=False)  # a new table is packed again
    assert torch.allclose(emb.logits(hidden), plain.flip(1), atol=tol, rtol=0)


@pytest.mark.heavy
def test_int4_greedy_tokens_match_transformers_unless_near_tie(smollm2_gguf: str, hf_smollm2: Any) -> None:
    # bf16 activations and scales in the fast int4 kernel vs transformers fp32 on the same
    # dequantized weights: the tokens agree until the reference's top-2 gap is small there.
    from compiled_serve.passes.quantized_linear import QuantizedLinearPass

    quantized = load_gguf_quantized(smollm2_gguf, "int4")  # bf16 scales: the fast kernel
    tok = quantized.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids[0]

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        assert QuantizedLinearPass()(gm) == 120
        return gm.forward

    forward = torch.compile(quantized.module.forward, backend=backend, dynamic=True, fullgraph=True)
    seq = ids.tolist()
    with torch.inference_mode():
        ref = hf_smollm2.generate(ids[None], max_new_tokens=24, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
        ref_tokens = ref.sequences[0, len(seq):].tolist()
        for step, want in enumerate(ref_tokens):
            hidden = forward(torch.tensor(seq), torch.arange(len(seq)))
            got = int(quantized.module.compute_logits(hidden[-1:]).argmax())
            if got != want:
                top2 = torch.topk(ref.scores[step][0].float(), 2).values
                assert float(top2[0] - top2[1]) < 0.5, f"step {step}: {got} != {want} with a clear gap"
                break
            seq.append(got)
