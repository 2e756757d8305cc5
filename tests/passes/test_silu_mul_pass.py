"""SiluMulPass on a real tiny Llama: one silu_and_mul per MLP, parity with the unrewritten graph."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pass_testing import LAYERS, assert_same_outputs, capture, op_count

from compiled_serve.passes.silu_mul import SiluMulPass


def test_every_mlp_activation_is_rewritten_and_outputs_match() -> None:
    gm, example = capture("llama")
    reference, _ = capture("llama")
    assert op_count(gm, "silu") == LAYERS and op_count(gm, "Tensor.chunk") == 3 * LAYERS  # 2 are RoPE's
    assert SiluMulPass()(gm) == LAYERS
    assert op_count(gm, "compiled_serve::silu_and_mul") == LAYERS
    assert op_count(gm, "silu") == 0 and op_count(gm, "Tensor.chunk") == 2 * LAYERS
    assert_same_outputs(reference, gm, example)


class TwoProjections(torch.nn.Module):
    """silu(gate) * up from two separate tensors: not the packed layout the op reads."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = input_ids.float()[:, None].expand(-1, 8)
        return F.silu(x) * (x + 1)


def test_unpacked_gate_and_up_are_left_alone() -> None:
    gm, _ = capture("two-projections", TwoProjections())
    assert SiluMulPass()(gm) == 0
    assert op_count(gm, "silu") == 1
