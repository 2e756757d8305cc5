"""The model-facing attention op: dense causal attention over one flat sequence.

Model files call `causal_attention(q, k, v, scale)` and know nothing about paging. The op is
registered through torch.library so that dynamo keeps it as one node in the captured graph;
`PagedAttentionPass` finds every such node and rewrites it into `paged_attention`.

Eagerly (no pass) it treats the flat token dimension as a single sequence whose first token
is at position 0. That is exactly what Hugging Face parity tests need.
"""

from __future__ import annotations

import torch

from compiled_serve.kernels.forward_context import in_forward_context


def causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale
    )
    return out.transpose(0, 1).contiguous()  # [num_tokens, num_heads, head_dim]


@torch.library.custom_op("compiled_serve::causal_attention", mutates_args=())
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    if in_forward_context():
        # Inside an engine step every attention must be paged. Getting here means an unrewritten
        # graph (or eager code) ran, e.g. after a silent dynamo fallback: never serve that.
        raise RuntimeError(
            "dense causal_attention ran inside a paged engine step: the model graph was not rewritten "
            "by PagedAttentionPass"
        )
    return causal_attention_reference(q, k, v, scale)


@causal_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(q)
