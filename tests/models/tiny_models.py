"""Tiny random Hugging Face models (the references) and a llama.cpp-style GGUF writer for them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from compiled_serve.models.config import ModelConfig
from compiled_serve.models.loaders.base import build_empty_module

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=64)


def tiny_hf_model(kind: str = "llama", seed: int = 0, **overrides: Any) -> Any:
    """A random HF causal LM (eager attention, fp32, eval). `kind`: llama | mistral | qwen2 | qwen3."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    kwargs: dict[str, Any] = {**TINY, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **overrides}
    if kind == "mistral":
        kwargs.setdefault("sliding_window", None)
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: make them matter
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ours_from_hf(hf_model: Any, dtype: torch.dtype = torch.float32) -> Any:
    """Our module for the HF model's config, weights streamed through `load_weights`."""
    config = ModelConfig.from_hf(hf_model.config)
    module = build_empty_module(config, dtype, torch.device("cpu"))
    module.load_weights(hf_model.state_dict().items())
    return module


# ---- GGUF writing (what llama.cpp's convert_hf_to_gguf.py does, for the tensors we use) -------

_GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute: halves -> interleaved pairs
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: str, hf_model: Any, arch: str, qtypes: dict[str, Any], extra_tensors: dict | None = None) -> None:
    """Write `hf_model` as a GGUF of `arch`; 2-D weights matching a `qtypes` key fragment get that
    GGML type (default F32)."""
    import gguf

    c = hf_model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    for name, tensor in hf_model.state_dict().items():
        if c.tie_word_embeddings and name == "lm_head.weight":
            continue
        w = tensor.float().numpy()
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{layer}.{_GGUF_BLOCK[rest]}"
            if arch == "llama" and rest.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                heads = c.num_attention_heads if "q_proj" in rest else c.num_key_value_heads
                w = llama_cpp_permute(w, heads)
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[name]
        qtype = next((q for frag, q in qtypes.items() if frag in gguf_name and w.ndim == 2), gguf.GGMLQuantizationType.F32)
        _add(writer, gguf_name, w, qtype)
    for name, w in (extra_tensors or {}).items():
        _add(writer, name, w, gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add(writer: Any, name: str, w: np.ndarray, qtype: Any) -> None:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, w.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
