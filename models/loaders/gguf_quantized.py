"""GGUF linear weights repacked into our quantized layouts, block by block, never as float32 [N, K].

GGML blocks run along a row (the input dim K), 32 values each (gguf-py's quants.py is the
reference we test against):
  Q8_0  [d: f16][32 x int8]          w = d * q
  Q4_0  [d: f16][16 bytes]           w = d * (q - 8),  q in 0..15
  Q4_1  [d: f16][m: f16][16 bytes]   w = d * q + m
  (the 16 bytes: value j in the low nibble of byte j, value j + 16 in the high nibble)

Exact targets: Q4_0/Q4_1 -> "int4" (scale d, zero m + 8d, or 0 for Q4_0: the same codes, no
requantization); Q8_0 -> "q8b" (the same int8 codes and block scales). In float32 scales the
repacked weights are the file's values up to one rounding of zero = m + 8d; with bf16 scales (the
fast kernel), the scales are rounded to bf16. Any other pairing ("bf16", per-channel "int8", Q4
into "q8b", Q8_0 into "int4") quantizes from one tensor's float values at a time.

`load_gguf_quantized(path, layout)` is the loader: norms as float32, the embedding (tied: the
logits head too) as bf16, every linear layer in `layout`.
"""

from __future__ import annotations

import numpy as np
import torch

from compiled_serve.errors import ModelLoadError
from compiled_serve.kernels import cpu_q8_head
from compiled_serve.models.loaders.base import (
    LoadedModel,
    build_empty_module,
    file_fingerprint,
    require_existing,
)
from compiled_serve.models.loaders.gguf_file import (
    _field,
    dequantize,
    gguf_config,
    hf_tensor_name,
    load_gguf_tokenizer,
    open_gguf,
    quantization_label,
    unpermute_rope_rows,
)
from compiled_serve.models.quantized import (
    LAYOUTS,
    CastingEmbedding,
    QuantizedWeight,
    install_quantized_weights,
    int4_from_codes,
    linear_weight_names,
    quantize_float,
    store_head_in,
)

BLOCK = 32


def _halves(raw: np.ndarray, offset: int) -> torch.Tensor:
    """f16 field at byte `offset` of each block -> float32 [rows, blocks]."""
    return torch.from_numpy(np.ascontiguousarray(raw[..., offset:offset + 2]).view(np.float16)[..., 0]).float()


def q4_codes(raw: np.ndarray, qs_offset: int) -> torch.Tensor:
    """uint8 codes [rows, blocks * 32] from blocks [rows, blocks, bytes]."""
    qs = torch.from_numpy(np.ascontiguousarray(raw[..., qs_offset:qs_offset + 16]))  # [rows, blocks, 16]
    return torch.cat([qs & 15, qs >> 4], dim=-1).reshape(raw.shape[0], -1)


def repack_blocks(qtype_name: str, data: np.ndarray, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Plain parts of one tensor's blocks, [rows, cols] codes and [rows, cols / 32] per block:
    Q4_*: codes, scales, mins (w = scale * q + min, exactly as gguf-py computes it); Q8_0: codes, scales."""
    if qtype_name not in ("Q8_0", "Q4_0", "Q4_1"):
        raise ModelLoadError(f"GGUF type {qtype_name} cannot be repacked (Q8_0, Q4_0, Q4_1 can)")
    rows, cols = shape
    raw = np.asarray(data).reshape(rows, cols // BLOCK, -1)  # [rows, blocks, block bytes]
    if qtype_name == "Q8_0":
        codes = torch.from_numpy(np.ascontiguousarray(raw[..., 2:]).view(np.int8)).reshape(rows, cols)
        return {"codes": codes, "scales": _halves(raw, 0)}
    if qtype_name == "Q4_0":
        d = _halves(raw, 0)
        return {"codes": q4_codes(raw, 2), "scales": d, "mins": -8 * d}  # d * (q - 8), exactly
    return {"codes": q4_codes(raw, 4), "scales": _halves(raw, 0), "mins": _halves(raw, 2)}


def repacks_exactly(qtype_name: str, layout: str) -> bool:
    """Whether a GGUF type maps onto `layout` code for code (else: quantized from float values)."""
    return (layout, qtype_name) in (("int4", "Q4_0"), ("int4", "Q4_1"), ("q8b", "Q8_0"))


def _permute_rows(parts: dict[str, torch.Tensor], n_head: int) -> dict[str, torch.Tensor]:
    return {k: unpermute_rope_rows(v, n_head) for k, v in parts.items()}


def quantized_from_parts(parts: dict[str, torch.Tensor], layout: str, compute_dtype: torch.dtype) -> QuantizedWeight:
    codes = parts["codes"]
    if layout == "int4" and "mins" in parts:
        # torch's int4: w = (q - 8) * scale + zero, so zero = min + 8 * scale (exact for Q4_0).
        return int4_from_codes(codes, parts["scales"], parts["mins"] + 8 * parts["scales"], compute_dtype)
    if layout == "q8b" and "mins" not in parts:
        return QuantizedWeight("q8b", tuple(codes.shape), {"codes": codes, "scales": parts["scales"]})
    raise ModelLoadError(f"these GGUF blocks do not repack into {layout!r} exactly")


def _stacked(module: torch.nn.Module, hf_name: str) -> tuple[str, object]:
    """(our parameter name, shard id or None) for a checkpoint name."""
    for packed, part, shard in module.stacked_params_mapping:
        if part in hf_name:
            return hf_name.replace(part, packed), shard
    return hf_name, None


def load_gguf_quantized(path: str, layout: str = "int4", compute_dtype: torch.dtype = torch.bfloat16,
                        dtype: torch.dtype = torch.float32, head_dtype: torch.dtype | None = torch.bfloat16
                        ) -> LoadedModel:
    """The GGUF at `path` on the CPU, every linear weight kept in `layout` (see module doc);
    the norms in `dtype`, the embedding (and logits head) in `head_dtype` (None: `dtype`; bf16 by
    default: the head is a third of a quantized decode step in fp32, `store_head_in`).

    Q4_0/Q4_1 into "int4" and Q8_0 into "q8b" repack code for code; other pairings quantize
    from each tensor's float values. The model still needs QuantizedLinearPass.
    """
    if layout not in LAYOUTS:
        raise ModelLoadError(f"unknown quantized layout {layout!r}; known: {', '.join(LAYOUTS)}")
    require_existing(path)
    reader = open_gguf(path)
    config = gguf_config(reader)
    module = build_empty_module(config, dtype, torch.device("cpu"))
    linear = set(linear_weight_names(module))
    params = dict(module.named_parameters())
    permuted = _field(reader, "general.architecture") == "llama"
    heads = {".self_attn.q_proj.": config.num_heads, ".self_attn.k_proj.": config.num_kv_heads}
    shards: dict[str, dict[object, torch.Tensor | dict[str, torch.Tensor]]] = {}
    filled: set[str] = set()
    q8_table: dict[str, torch.Tensor] | None = None
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue
        if (tensor.name == "token_embd.weight" and tensor.tensor_type.name == "Q8_0" and head_dtype is not None
                and config.tie_word_embeddings and cpu_q8_head.available()):
            q8_table = repack_blocks("Q8_0", tensor.data, (int(tensor.shape[1]), int(tensor.shape[0])))
        hf_name = hf_tensor_name(tensor.name)
        name, shard = _stacked(module, hf_name)
        n_head = next((n for frag, n in heads.items() if permuted and frag in hf_name), None)
        if name not in params:
            if config.tie_word_embeddings and hf_name == "lm_head.weight":
                continue
            raise ModelLoadError(f"GGUF tensor {tensor.name} ({hf_name}) has no place in {config.architecture}")
        if name not in linear or not repacks_exactly(tensor.tensor_type.name, layout):
            w = torch.from_numpy(dequantize(tensor).copy())
            part: torch.Tensor | dict[str, torch.Tensor] = unpermute_rope_rows(w, n_head) if n_head else w
        else:
            shape = (int(tensor.shape[1]), int(tensor.shape[0]))
            part = repack_blocks(tensor.tensor_type.name, tensor.data, shape)
            part = _permute_rows(part, n_head) if n_head else part
        if name not in linear:
            params[name].data.copy_(part)
            filled.add(name)
        else:
            shards.setdefault(name, {})[shard] = part
    missing = sorted(set(params) - filled - set(shards))
    if missing:
        raise ModelLoadError(f"GGUF file lacks tensors for {missing[:5]}")
    weights = {name: _assemble(module, name, parts, layout, compute_dtype) for name, parts in shards.items()}
    install_quantized_weights(module, weights)
    if head_dtype is not None:
        store_head_in(module, head_dtype)
        emb = module.model.embed_tokens
        if q8_table is not None and isinstance(emb, CastingEmbedding) and cpu_q8_head.codes_fit(q8_table["codes"]):
            emb.q8_table = (q8_table["codes"], q8_table["scales"])  # the head for a few rows (kernels/cpu_q8_head.py)
    chat_template = _field(reader, "tokenizer.chat_template", None)
    has_vocab = "tokenizer.ggml.tokens" in reader.metadata
    return LoadedModel(
        module=module, config=config,
        tokenizer=load_gguf_tokenizer(path, chat_template) if has_vocab else None,
        chat_template=chat_template,
        source=f"gguf:{path} ({quantization_label(reader)}, linear weights as {layout})",
        weight_fingerprint=file_fingerprint([path], extra=f"quantized:{layout}:{compute_dtype}:{dtype}:head={head_dtype}"),
    )


def _assemble(module: torch.nn.Module, name: str, parts: dict, layout: str, compute_dtype: torch.dtype
              ) -> QuantizedWeight:
    """One linear's shards (q/k/v, gate/up) stacked along N in the layer's order, then laid out."""
    owner = module.get_submodule(name.rpartition(".")[0])
    order = sorted(parts, key=lambda s: owner.shard_offsets[s][0]) if None not in parts else [None]
    if set(order) != set(getattr(owner, "shard_offsets", {None: None})):
        raise ModelLoadError(f"GGUF file lacks shards of {name}")
    pieces = [parts[s] for s in order]
    if len({isinstance(p, torch.Tensor) for p in pieces}) > 1:
        raise ModelLoadError(f"{name}: its shards mix GGUF types that repack and ones that do not")
    if isinstance(pieces[0], torch.Tensor):
        return quantize_float(torch.cat(pieces), layout, compute_dtype)
    stacked = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
    return quantized_from_parts(stacked, layout, compute_dtype)
