"""Helpers to run our model and a Hugging Face reference on one sequence and compare logits."""

from __future__ import annotations

from typing import Any

import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4,",
]


@torch.no_grad()
def hf_logits(model: Any, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    # ids: [T] -> [T, vocab] float32, one sequence, no cache
    pos = torch.arange(len(ids)) if positions is None else positions
    return model(input_ids=ids[None], position_ids=pos[None], use_cache=False).logits[0].float()


@torch.no_grad()
def our_logits(module: Any, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    pos = torch.arange(len(ids)) if positions is None else positions
    return module.compute_logits(module(ids, pos))


def assert_logits_match(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """Tolerance: max |ours - ref| <= 1e-5 * max |ref| in fp32 (measured ~1e-6 on SmolLM2; the
    differences come only from matmul blocking of packed vs separate projections). Argmax must
    agree wherever the reference's top-2 gap exceeds 1e-2."""
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= rel * scale, f"max abs diff {diff:.3g} > {rel} * logit scale {scale:.3g}"
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 1e-2
    assert torch.equal(ours.argmax(-1)[decisive], ref.argmax(-1)[decisive])
