"""FusedAddRMSNormPass on real tiny decoders: exact op counts, and parity with the unrewritten graph."""

from __future__ import annotations

import pytest
from pass_testing import LAYERS, assert_same_outputs, capture, op_count

from compiled_serve.passes.fused_add_rms_norm import FusedAddRMSNormPass
from compiled_serve.passes.noop_elimination import NoOpEliminationPass


@pytest.mark.parametrize(("kind", "noop_first", "plain"), [
    ("llama", False, 1),             # the first layer's input norm has no residual add before it
    ("qwen3", True, 1 + 2 * LAYERS),  # plus per-head q_norm and k_norm in every layer
])
def test_every_norm_is_rewritten_and_outputs_match(kind: str, noop_first: bool, plain: int) -> None:
    gm, example = capture(kind)
    reference, _ = capture(kind)
    if noop_first:  # in fp32 the casts are gone first; the matcher must not depend on them
        NoOpEliminationPass()(gm)
    assert op_count(gm, "rsqrt") == 2 * LAYERS + 1 + (plain - 1)
    rewrite = FusedAddRMSNormPass()
    assert rewrite(gm) == 2 * LAYERS + plain
    assert (rewrite.fused, rewrite.plain) == (2 * LAYERS, plain)
    assert op_count(gm, "compiled_serve::fused_add_rms_norm") == 2 * LAYERS
    assert op_count(gm, "compiled_serve::rms_norm") == plain
    assert op_count(gm, "rsqrt") == 0 and op_count(gm, "Tensor.pow") == 0 and op_count(gm, "Tensor.mean") == 0
    assert_same_outputs(reference, gm, example)
