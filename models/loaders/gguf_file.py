"""A llama.cpp GGUF file: metadata -> ModelConfig, tensors dequantized to float one at a time
(a tensor-parallel rank: only its rows or columns of each, gguf_slice.py).

Quirks handled here:
- llama.cpp's converter permutes the rows of q/k for llama-arch models (its RoPE rotates
  interleaved pairs, Hugging Face's rotates halves); we undo that permutation. Qwen2/3 files
  are written unpermuted.
- Tied embeddings are signalled by the absence of `output.weight`.
- Llama 3.1-style files carry `rope_freqs.weight` (per-frequency divisors) instead of rope
  scaling metadata; we recover the matching "llama3" parameters or refuse the file.
- The tokenizer is rebuilt by transformers from the GGUF vocab (seconds), so it is cached
  per file in-process.
- Metadata comes from our own lean parser (gguf_reader.py): gguf.GGUFReader spends seconds
  building views of every vocabulary string that we never read.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from compiled_serve.errors import ModelLoadError
from compiled_serve.models.config import ModelConfig
from compiled_serve.models.layers import rope_inv_freq
from compiled_serve.models.loaders.base import (
    LoadedModel,
    LoadRequest,
    WeightFormat,
    build_empty_module,
    file_fingerprint,
    register_format,
    require_existing,
)
from compiled_serve.models.loaders.gguf_reader import GGUFFile
from compiled_serve.models.loaders.gguf_slice import GGUFSlice

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_ROPE_FREQS = "rope_freqs.weight"
_REQUIRED = object()


def open_gguf(path: str) -> GGUFFile:
    try:
        return GGUFFile(path)
    except (ValueError, struct.error, UnicodeDecodeError) as e:  # foreign or truncated files
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e


def _field(reader: GGUFFile, key: str, default: Any = _REQUIRED) -> Any:
    if key not in reader.metadata:
        if default is _REQUIRED:
            raise ModelLoadError(f"GGUF metadata lacks {key!r}")
        return default
    return reader.metadata[key]


def gguf_config(reader: GGUFFile) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (supported: {sorted(_ARCHITECTURES)})")
    architecture = _ARCHITECTURES[arch]
    if arch == "llama" and "mistral" in str(_field(reader, "general.name", "")).lower():
        architecture = "MistralForCausalLM"  # same module; only the name differs

    tensor_names = {t.name for t in reader.tensors}
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    num_heads = int(_field(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads))
    if int(_field(reader, f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise ModelLoadError("GGUF: partial rotary embeddings (rope.dimension_count != head_dim) are not supported")
    scaling_type = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", ""):
        raise ModelLoadError(f"GGUF: rope scaling {scaling_type!r} is not supported")
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    tokens = reader.metadata.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size", None) or (len(tokens) if tokens is not None else None)
    if vocab is None:
        raise ModelLoadError("GGUF metadata gives no vocab size")
    stop_ids = [_field(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    config = ModelConfig(
        architecture=architecture,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in stop_ids if i is not None)),
    )
    if _ROPE_FREQS in tensor_names:
        freqs = torch.from_numpy(dequantize(_tensor(reader, _ROPE_FREQS)).copy()).flatten()
        config = config.replace(rope_scaling=_llama3_scaling_from_freqs(reader, arch, config, freqs))
    return config


def _llama3_scaling_from_freqs(reader: GGUFFile, arch: str, config: ModelConfig, freqs: torch.Tensor) -> dict[str, Any]:
    # llama.cpp stores inv_freq_plain / inv_freq_scaled per frequency; find the llama3 parameters
    # (Meta's releases all use low 1, high 4, original context 8192) that reproduce it.
    plain = rope_inv_freq(config.head_dim, config.rope_theta, None)
    original = int(_field(reader, f"{arch}.rope.scaling.original_context_length", 8192))
    stated = _field(reader, f"{arch}.rope.scaling.factor", None)
    for factor in [stated] if stated else [8.0, 32.0, 16.0, 4.0]:
        scaling = {"rope_type": "llama3", "factor": float(factor), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": original}
        if torch.allclose(plain / rope_inv_freq(config.head_dim, config.rope_theta, scaling), freqs, rtol=1e-3):
            return scaling
    raise ModelLoadError("GGUF: rope_freqs.weight matches no llama3 rope scaling; this file is not supported")


def _tensor(reader: GGUFFile, name: str) -> Any:
    return next(t for t in reader.tensors if t.name == name)


def dequantize(tensor: Any) -> np.ndarray:
    """One GGUF tensor as float32 numpy, shaped like its Hugging Face counterpart ([out, in])."""
    from gguf.quants import dequantize as gguf_dequantize

    try:
        array = gguf_dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ModelLoadError(f"GGUF tensor {tensor.name}: {e}") from e
    return array.reshape([int(n) for n in reversed(tensor.shape)])  # ggml lists dims fastest-first


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return gguf_name  # unknown: the model reports it as unexpected, under its GGUF name


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp wrote rows as [head, head_dim/2, 2] (pairs); Hugging Face wants [head, 2, head_dim/2].
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf_weights(reader: GGUFFile, config: ModelConfig, lazy: bool = False) -> Iterator[tuple[str, Any]]:
    """(hf_name, float32 tensor) pairs, dequantizing one tensor at a time; `lazy` (a
    tensor-parallel rank): (hf_name, GGUFSlice) pairs that dequantize only what is indexed."""
    permuted = _field(reader, "general.architecture") == "llama"
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            continue  # folded into config.rope_scaling
        if lazy:
            name = hf_tensor_name(tensor.name)
            heads = config.num_heads if ".self_attn.q_proj." in name else \
                config.num_kv_heads if ".self_attn.k_proj." in name else None
            yield name, GGUFSlice(tensor, heads if permuted else None)
            continue
        array = dequantize(tensor)
        weight = torch.from_numpy(array if array.flags.writeable else array.copy())
        name = hf_tensor_name(tensor.name)
        if permuted and ".self_attn.q_proj." in name:
            weight = unpermute_rope_rows(weight, config.num_heads)
        elif permuted and ".self_attn.k_proj." in name:
            weight = unpermute_rope_rows(weight, config.num_kv_heads)
        yield name, weight


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str, size: int, mtime_ns: int) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    except Exception as e:  # conversion of an unusual vocab can fail in many ways
        raise ModelLoadError(f"cannot build a tokenizer from {path}: {e}") from e


def load_gguf_tokenizer(path: str, chat_template: str | None) -> Any:
    path = os.path.realpath(path)
    st = os.stat(path)
    tokenizer = _cached_tokenizer(path, st.st_size, st.st_mtime_ns)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def quantization_label(reader: GGUFFile) -> str:
    import gguf

    file_type = _field(reader, "general.file_type", None)
    try:
        return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        counts = Counter(t.tensor_type.name for t in reader.tensors)
        return counts.most_common(1)[0][0] if counts else "empty"


def load_gguf(request: LoadRequest) -> LoadedModel:
    path = request.model
    require_existing(path)
    reader = open_gguf(path)
    config = gguf_config(reader)
    module = build_empty_module(config, request.dtype, request.device, tp=request.tp)
    module.load_weights(iter_gguf_weights(reader, config, lazy=request.tp[1] > 1))
    chat_template = _field(reader, "tokenizer.chat_template", None)
    has_vocab = "tokenizer.ggml.tokens" in reader.metadata  # tensor-only files (tests, merges) have none
    return LoadedModel(
        module=module,
        config=config,
        tokenizer=load_gguf_tokenizer(path, chat_template) if has_vocab else None,
        chat_template=chat_template,
        source=f"gguf:{path} ({quantization_label(reader)}, dequantized)",
        weight_fingerprint=file_fingerprint([path]),
    )


@register_format
class GGUFFormat(WeightFormat):
    name = "gguf"
    auto_priority = 10

    def claims(self, model: str) -> bool:
        return model.lower().endswith(".gguf")

    def load(self, request: LoadRequest) -> LoadedModel:
        return load_gguf(request)
