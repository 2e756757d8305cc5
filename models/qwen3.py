"""Qwen3: the Llama decoder with per-head RMSNorm on q and k before RoPE (`config.qk_norm`)."""

from __future__ import annotations

from compiled_serve.errors import ModelLoadError
from compiled_serve.models.config import ModelConfig
from compiled_serve.models.llama import LlamaForCausalLM
from compiled_serve.models.registry import register_model


@register_model("Qwen3ForCausalLM")
class Qwen3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig):
        if not config.qk_norm:
            raise ModelLoadError("Qwen3ForCausalLM needs qk_norm=True (q_norm / k_norm per head)")
        super().__init__(config)
