"""RotaryPass on real tiny decoders: one rotary_embedding per layer replaces the rotate_half
arithmetic on q and k; outputs match at random (non-contiguous) positions."""

from __future__ import annotations

import pytest
from pass_testing import LAYERS, assert_same_outputs, capture, op_count

from compiled_serve.passes.fused_add_rms_norm import FusedAddRMSNormPass
from compiled_serve.passes.noop_elimination import NoOpEliminationPass
from compiled_serve.passes.paged_attention import PagedAttentionPass
from compiled_serve.passes.rotary import RotaryPass


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_rope_on_q_and_k_is_one_op_per_layer_and_outputs_match(kind: str) -> None:
    gm, example = capture(kind)
    reference, _ = capture(kind)
    if kind == "qwen3":  # q/k pass through the fused per-head norm first
        NoOpEliminationPass()(gm)
        FusedAddRMSNormPass()(gm)
    assert op_count(gm, "neg") == 2 * LAYERS and op_count(gm, "cat") == 1 + 2 * LAYERS
    assert RotaryPass()(gm) == LAYERS
    assert op_count(gm, "compiled_serve::rotary_embedding") == LAYERS
    assert op_count(gm, "neg") == 0 and op_count(gm, "cat") == 0 and op_count(gm, "Tensor.chunk") == LAYERS  # the MLP's
    assert op_count(gm, "rope_cos_sin_cache") == 1  # one table for all layers
    assert_same_outputs(reference, gm, example)


def test_pairs_q_and_k_through_paged_attention_too() -> None:
    gm, _ = capture("llama")
    PagedAttentionPass()(gm)
    assert RotaryPass()(gm) == LAYERS
