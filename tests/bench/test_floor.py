"""The floor against PERF.md's own table and a hand computation; parameter counts against the
published sizes of the two models."""

from __future__ import annotations

import pytest
import torch

from compiled_serve.bench.floor import Ceilings, ModelCost, model_cost, workload_floor
from compiled_serve.bench.workloads import WORKLOADS, draw_requests
from compiled_serve.models.config import ModelConfig
from compiled_serve.models.presets import preset_config

H200 = Ceilings(copy_bytes_per_s=4235e9, matmul_flop_per_s=795e12)  # PERF.md, measured 2026-12-02


def test_hand_computed_floor() -> None:
    cost = ModelCost(params=10, weight_bytes=100, kv_bytes_per_token=8)
    floor = workload_floor(cost, [3, 5], [2, 4], Ceilings(copy_bytes_per_s=1000.0, matmul_flop_per_s=1e4))
    # KV reads: (3 + 4) + (5 + 6 + 7 + 8) = 33 tokens * 8 B; weights: 4 steps * 100 B.
    assert floor.decode_s == pytest.approx((33 * 8 + 4 * 100) / 1000)
    assert floor.prefill_s == pytest.approx(2 * 10 * 8 / 1e4)
    assert floor.steps == 4 and floor.output_tokens == 6 and floor.prompt_tokens == 8
    assert floor.out_tok_s == pytest.approx(6 / (0.664 + 0.016))
    assert floor.decode_step_s == pytest.approx(0.664 / 4)


def test_parameter_counts_match_the_published_models() -> None:
    llama = model_cost(preset_config("llama-3.1-8b"), torch.bfloat16)
    assert llama.params == 8_030_261_248  # Llama-3.1-8B
    assert llama.weight_bytes == 2 * (8_030_261_248 - 128256 * 4096)  # untied: input embedding left out
    assert llama.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2
    qwen = model_cost(preset_config("qwen3-0.6b"), torch.bfloat16)
    assert qwen.params == 596_049_920  # Qwen3-0.6B: 0.44B non-embedding + the tied 151936 x 1024 table
    assert qwen.params - 151936 * 1024 == 440_467_456
    assert qwen.weight_bytes == 2 * qwen.params  # tied: the logits read the whole table every step


def test_the_fp8_floor_counts_one_byte_per_linear_weight_and_twice_the_matmul_rate() -> None:
    bf16 = model_cost(preset_config("llama-3.1-8b"), torch.bfloat16)
    fp8 = model_cost(preset_config("llama-3.1-8b"), torch.bfloat16, quantization="fp8")
    # Per layer: q 4096x4096, k and v 1024x4096 each, o 4096x4096, gate/up 14336x4096, down 4096x14336.
    per_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096
    rows = 4096 + 2 * 1024 + 4096 + 2 * 14336 + 4096  # one float32 scale per output channel
    assert fp8.params == bf16.params and fp8.fp8_params == 32 * per_layer
    assert fp8.weight_bytes == bf16.weight_bytes - 32 * (2 * per_layer - (per_layer + 4 * rows))
    linear = 8_030_261_248 - 2 * 128256 * 4096 - 32 * 2 * 4096 - 4096  # less both tables and the norms
    assert linear == fp8.fp8_params
    # lm_head and the norms stay bf16: about half the bf16 step's bytes.
    assert fp8.weight_bytes == linear + 32 * 4 * rows + 2 * (128256 * 4096 + 32 * 2 * 4096 + 4096)
    tokens = [1000]
    ratio = workload_floor(fp8, tokens, [1], H200).prefill_s / workload_floor(bf16, tokens, [1], H200).prefill_s
    assert ratio == pytest.approx((bf16.params - fp8.fp8_params / 2) / bf16.params)
    fp8_kv = model_cost(preset_config("llama-3.1-8b"), torch.bfloat16, kv_cache_dtype="fp8")
    assert fp8_kv.kv_bytes_per_token * 2 == bf16.kv_bytes_per_token and fp8_kv.weight_bytes == bf16.weight_bytes
    with pytest.raises(ValueError, match="int4"):
        model_cost(preset_config("llama-3.1-8b"), torch.bfloat16, quantization="int4")


def test_untied_tiny_model_leaves_only_the_input_embedding_out() -> None:
    shape = dict(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=8, intermediate_size=16,
                 num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
    # Per layer: q 8x8, k and v 8x4 each, o 8x8, gate/up/down 8x16 each, two norms of 8; final norm 8.
    body = (64 + 32 + 32 + 64) + 3 * 128 + 16 + 8
    untied = model_cost(ModelConfig(**shape), torch.float32)
    assert untied.params == body + 2 * 800
    assert untied.weight_bytes == 4 * (body + 800)
    tied = model_cost(ModelConfig(**shape, tie_word_embeddings=True), torch.float32)
    assert tied.params == tied.weight_bytes // 4 == body + 800
    assert untied.kv_bytes_per_token == 1 * 2 * 1 * 4 * 4


@pytest.mark.parametrize("workload_id, out_tokens, seconds, tok_s", [
    ("W1", 138_985, 3.81, 36_463), ("W2", 68_892, 6.89, 10_000)])
def test_perf_md_floors(workload_id: str, out_tokens: int, seconds: float, tok_s: int) -> None:
    workload = WORKLOADS[workload_id]
    config = preset_config(workload.model)
    requests = draw_requests(workload, config.vocab_size)
    floor = workload_floor(model_cost(config, torch.bfloat16), requests.prompt_lens, requests.output_lens, H200)
    assert floor.output_tokens == out_tokens
    assert round(floor.seconds, 2) == seconds
    assert round(floor.out_tok_s) == tok_s


def test_perf_md_w3_step_floor() -> None:
    workload = WORKLOADS["W3"]
    config = preset_config(workload.model)
    requests = draw_requests(workload, config.vocab_size)
    floor = workload_floor(model_cost(config, torch.bfloat16), requests.prompt_lens, requests.output_lens, H200)
    assert round(1e3 * floor.decode_step_s, 2) == 3.58
    assert round(1 / floor.decode_step_s) == 279
