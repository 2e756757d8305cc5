"""ModelConfig.from_hf on transformers configs and raw config.json dicts; validation; sizes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_hf_model

from compiled_serve.errors import ModelLoadError
from compiled_serve.models.config import ModelConfig
from compiled_serve.models.registry import register_model, resolve_model_class, supported_architectures

LLAMA31_JSON = {  # Meta-Llama-3.1-8B-Instruct config.json (old layout: rope_theta + rope_scaling)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "mlp_bias": False, "attention_bias": False,
}


def test_from_hf_old_style_dict() -> None:
    config = ModelConfig.from_hf(LLAMA31_JSON)
    assert config.head_dim == 128 and config.num_kv_heads == 8
    assert config.rope_theta == 500000.0 and config.rope_scaling is not None and config.rope_scaling["factor"] == 8.0
    assert config.eos_token_ids == (128001, 128008, 128009) and config.bos_token_id == 128000
    assert not config.tie_word_embeddings and not config.attention_bias and not config.qk_norm
    assert hash(config) == hash(ModelConfig.from_hf(dict(LLAMA31_JSON))) and {config: 1}[config.replace()] == 1


@pytest.mark.parametrize("kind,bias,qk_norm", [("llama", False, False), ("mistral", False, False),
                                               ("qwen2", True, False), ("qwen3", False, True)])
def test_from_hf_pretrained_config_and_param_count(kind: str, bias: bool, qk_norm: bool) -> None:
    hf = tiny_hf_model(kind)
    config = ModelConfig.from_hf(hf.config)  # transformers 5 layout: rope_parameters
    assert config == ModelConfig.from_hf(hf.config.to_dict())
    assert (config.attention_bias, config.qk_norm, config.head_dim) == (bias, qk_norm, 16)
    assert config.architecture == type(hf).__name__
    assert config.num_params() == sum(p.numel() for p in hf.parameters())
    assert config.kv_bytes_per_token(torch.float32) == 2 * 2 * 2 * 16 * 4


def test_from_hf_model_type_only_and_defaults() -> None:
    config = ModelConfig.from_hf({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                                  "num_hidden_layers": 1, "num_attention_heads": 2})
    assert config.architecture == "Qwen2ForCausalLM" and config.attention_bias and config.num_kv_heads == 2
    assert config.head_dim == 4 and config.rope_scaling is None and config.eos_token_ids == ()


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling 'linear' is not supported"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"sliding_window": 4096}, "sliding-window attention"),
    ({"num_key_value_heads": 5}, "multiple of num_kv_heads"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_from_hf_rejects(change: dict, message: str) -> None:
    raw = {k: v for k, v in {**LLAMA31_JSON, **change}.items() if v is not None}
    with pytest.raises(ModelLoadError, match=message):
        ModelConfig.from_hf(raw)


def test_sliding_window_switched_off_or_as_long_as_context_is_fine() -> None:
    ModelConfig.from_hf({**LLAMA31_JSON, "sliding_window": 4096, "use_sliding_window": False})
    ModelConfig.from_hf({**LLAMA31_JSON, "sliding_window": 131072})


def test_validation() -> None:
    base = ModelConfig.from_hf(LLAMA31_JSON)
    with pytest.raises(ModelLoadError, match="num_layers must be a positive int"):
        base.replace(num_layers=0)
    with pytest.raises(ModelLoadError, match="llama3 rope scaling lacks"):
        base.replace(rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ModelLoadError, match="head_dim must be even"):
        base.replace(head_dim=127)


def test_registry() -> None:
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"} <= set(
        supported_architectures())
    assert resolve_model_class(["Unknown", "Qwen3ForCausalLM"]).__name__ == "Qwen3ForCausalLM"

    @register_model("MyTestForCausalLM")
    class Mine(resolve_model_class(["LlamaForCausalLM"])):  # type: ignore[misc]
        pass

    assert resolve_model_class(["MyTestForCausalLM"]) is Mine
    with pytest.raises(ModelLoadError, match=r"unsupported model architecture \['GPT2LMHeadModel'\]"):
        resolve_model_class(["GPT2LMHeadModel"])
