"""Paged attention: write the step's K/V into the block cache, then attend through block tables.

`paged_attention_reference` is the pure-torch definition every kernel is tested against.
The custom op `compiled_serve::paged_attention(q, k, v, kv_cache, scale)` is what
`PagedAttentionPass` inserts. It takes its layer's cache as an argument and declares that it
writes it (`mutates_args=("kv_cache",)`), so functionalization, Inductor's reinplacing and any
reordering see the write; the step metadata (slot mapping, block tables, lengths) is read-only
and comes from the forward context.

`compiled_serve::step_kv_caches(caches)` is how the caches become graph values: the compiled
step's entry point (passes/pipeline.py) calls it on the forward context's caches, so dynamo lifts
them into the captured graph as inputs; `PagedAttentionPass` hands layer i's input to layer i's
`paged_attention` and erases the call. It does nothing, and declares that it may write every
cache, so dead-code elimination never drops it (nor the inputs) before the pass has run.
"""

from __future__ import annotations

import torch

from compiled_serve.kernels import cpu_decode_attention
from compiled_serve.kernels.forward_context import current_forward_context, in_forward_context


def write_kv_reference(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = padding row (never written)
    k_scale: float = 1.0,  # the cache holds k / k_scale (an FP8 cache: saturated at +-448)
    v_scale: float = 1.0,
) -> None:
    num_tokens = slot_mapping.shape[0]
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])  # [2, slots, kvh, hd]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    for i, (x, s) in enumerate(((k, k_scale), (v, v_scale))):
        x = x[:num_tokens][valid].float() / s
        if flat.dtype == torch.float8_e4m3fn:
            x = x.clamp(-448.0, 448.0)
        flat[i, slots] = x.to(flat.dtype)


def paged_attention_reference(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: list[int],  # context length of each sequence, new tokens included
    query_start_loc: list[int],  # [num_seqs + 1] offsets of each sequence's query tokens
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole cached context.

    Query token j of a sequence with q_len new tokens and context ctx sits at position
    ctx - q_len + j and sees keys at positions <= its own. Rows past the last sequence
    (bucket padding) come back as zeros.
    """
    out = torch.zeros_like(q)
    block_size = kv_cache.shape[2]
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    group = q.shape[1] // num_kv_heads
    for i, ctx in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        num_blocks = -(-ctx // block_size)
        blocks = block_tables[i, :num_blocks].long()
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:ctx]  # [ctx, kvh, hd]
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:ctx]
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        k_pos = torch.arange(ctx, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [q_len, ctx]
        qi = q[start:end].transpose(0, 1)  # [heads, q_len, hd]
        o = torch.nn.functional.scaled_dot_product_attention(
            qi, k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype), attn_mask=mask, scale=scale
        )
        out[start:end] = o.transpose(0, 1)
    return out


# Defined through torch.library.Library rather than the custom_op decorator: a step calls the op
# once a layer from the compiled graph, and custom_op's wrapper around a mutating kernel cost
# ~12 us a call on the 2-core CPU (the op 52 -> 40 us; a no-op kernel 9.5 against 1.5 us; 30
# layers: ~0.36 ms of an ~8 ms single-stream step, docs/perf-notes.md). Same schema,
# same name: the graphs and persisted builds do not change.
_LIB = torch.library.Library("compiled_serve", "FRAGMENT")
_LIB.define("paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, float scale) -> Tensor")


def paged_attention_cpu_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, scale: float
) -> torch.Tensor:
    """Writes this step's k/v into `kv_cache` (this layer's), then attends. Shapes as the reference."""
    from compiled_serve.kernels.paged_attention_cpu import paged_attention_cpu, plan_decode, write_kv_cpu

    meta = current_forward_context()
    if meta.cpu_slots_valid is None:  # the same for every layer: checked once a step
        meta.cpu_slots_valid = bool((meta.slot_mapping >= 0).all())
    step = meta.cpu_decode_step
    if step is None:  # likewise decided once a step
        decode_only = meta.max_query_len == 1 and q.shape[0] == meta.seq_lens.shape[0] and meta.cpu_slots_valid
        step = meta.cpu_decode_step = decode_only and cpu_decode_attention.plan_step(
            meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.max_seq_len) or False
    if step:
        out = cpu_decode_attention.decode_attention(q, k, v, kv_cache, step, scale)
        if out is not None:
            return out
    write_kv_cpu(k, v, kv_cache, meta.slot_mapping, all_valid=meta.cpu_slots_valid)
    seq_lens = meta.seq_lens_host if meta.seq_lens_host is not None else meta.seq_lens.tolist()
    qsl = meta.query_start_loc_host if meta.query_start_loc_host is not None else meta.query_start_loc.tolist()
    plan = meta.cpu_decode_plan
    if plan is None:  # planned by the first layer, reused by the rest; False: no sequence decodes
        plan = meta.cpu_decode_plan = plan_decode(meta.block_tables, seq_lens, qsl, kv_cache.shape[2],
                                                   q.shape[0]) or False
    if plan is False:
        return paged_attention_reference(q, kv_cache, meta.block_tables, seq_lens, qsl, scale)
    return paged_attention_cpu(q, kv_cache, meta.block_tables, seq_lens, qsl, scale, plan=plan)


def paged_attention_cuda_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, scale: float
) -> torch.Tensor:
    """On CUDA: the Triton KV write + unified paged-attention kernel, no host syncs."""
    from compiled_serve.kernels.kv_write import paged_attention_with_kv_write_triton

    meta = current_forward_context()
    return paged_attention_with_kv_write_triton(
        q, k, v, kv_cache, meta.slot_mapping, meta.block_tables, meta.seq_lens,
        meta.query_start_loc, meta.max_query_len, meta.max_seq_len, scale,
    )


_LIB.impl("paged_attention", paged_attention_cpu_kernel, "CPU")
_LIB.impl("paged_attention", paged_attention_cuda_kernel, "CUDA")


@torch.library.register_fake("compiled_serve::paged_attention", lib=_LIB)
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("compiled_serve::step_kv_caches", mutates_args=("caches",))
def step_kv_caches(caches: list[torch.Tensor]) -> None:
    """Marks the step's per-layer caches [2, num_blocks, block_size, num_kv_heads, head_dim] as graph inputs."""


@step_kv_caches.register_fake
def _(caches: list[torch.Tensor]) -> None:
    return None


def kv_caches_for_step() -> list[torch.Tensor]:
    """The forward context's per-layer caches; none outside a step (a dense, unpaged call)."""
    return current_forward_context().kv_caches if in_forward_context() else []
