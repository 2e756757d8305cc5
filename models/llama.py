"""The Llama decoder, parametrized enough to also be Mistral (no sliding window), Qwen2 and Qwen3.

Differences are config flags, not copies: `attention_bias` (Qwen2 q/k/v bias), `qk_norm` (Qwen3
per-head RMSNorm on q and k before RoPE), `tie_word_embeddings`, `rope_scaling` (Llama 3.1).
Parameter names mirror Hugging Face's except the packed `qkv_proj` and `gate_up_proj`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

import compiled_serve.kernels.causal_attention  # noqa: F401  (registers torch.ops.compiled_serve.causal_attention)
from compiled_serve.models.base import CausalLM
from compiled_serve.models.config import ModelConfig
from compiled_serve.models.layers import (
    GateUpLinear,
    QKVLinear,
    RMSNorm,
    RotaryEmbedding,
    SiluAndMul,
    VocabEmbedding,
    rotate_half,
)
from compiled_serve.models.registry import register_model
from compiled_serve.models.weight_loading import StackedParamsMapping, load_hf_weights


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.qkv_proj = QKVLinear(
            config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads, config.attention_bias
        )
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # hidden: [num_tokens, hidden_size]; cos, sin: [num_tokens, 1, head_dim]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q = q.view(-1, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # static: fixed by the config
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # The scale derives from an int attribute, so dynamo bakes it in as a constant.
        scale = self.head_dim**-0.5
        out = torch.ops.compiled_serve.causal_attention(q, k, v, scale)  # [num_tokens, num_heads, head_dim]
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = GateUpLinear(config.hidden_size, config.intermediate_size)
        self.act_fn = SiluAndMul()
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, hidden] -> [num_tokens, 2 * intermediate] -> [num_tokens, hidden]
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Written unfused (residual add, then norm); a graph pass fuses RMSNorm + residual.
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        cos, sin = self.rotary_emb(positions, hidden.dtype)  # once for all layers
        for layer in self.layers:
            hidden = layer(hidden, cos, sin)
        return self.norm(hidden)


@register_model("LlamaForCausalLM")
class LlamaForCausalLM(CausalLM):
    # Checkpoint q/k/v and gate/up tensors land in rows of our packed projections.
    stacked_params_mapping: StackedParamsMapping = (
        (".qkv_proj.", ".q_proj.", "q"),
        (".qkv_proj.", ".k_proj.", "k"),
        (".qkv_proj.", ".v_proj.", "v"),
        (".gate_up_proj.", ".gate_proj.", 0),
        (".gate_up_proj.", ".up_proj.", 1),
    )

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        # Tied: logits reuse the embedding matrix directly (no second parameter to keep in sync).
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [num_tokens] -> [num_tokens, hidden_size]
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [n, hidden_size] -> [n, vocab_size] float32
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        if hasattr(head, "logits"):  # a table kept in bf16, packed for oneDNN (models/quantized.py)
            return head.logits(hidden)
        return F.linear(hidden.to(head.weight.dtype), head.weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tied = self.lm_head is None

        def skip(name: str) -> bool:
            # Old checkpoints store RoPE frequencies; tied ones may still ship lm_head.weight.
            return "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight")

        load_hf_weights(self, weights, self.stacked_params_mapping, skip)


@register_model("MistralForCausalLM")
class MistralForCausalLM(LlamaForCausalLM):
    """Mistral without sliding-window attention is Llama (ModelConfig.from_hf refuses a window)."""
