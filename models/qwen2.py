"""Qwen2: the Llama decoder with biases on the q/k/v projections (`config.attention_bias`)."""

from __future__ import annotations

from compiled_serve.errors import ModelLoadError
from compiled_serve.models.config import ModelConfig
from compiled_serve.models.llama import LlamaForCausalLM
from compiled_serve.models.registry import register_model


@register_model("Qwen2ForCausalLM")
class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig):
        if not config.attention_bias:
            raise ModelLoadError("Qwen2ForCausalLM needs attention_bias=True (its q/k/v projections have biases)")
        super().__init__(config)
