"""Our decoders against Hugging Face transformers: GQA ratios, tied / untied heads, llama3 RoPE,
Qwen2 biases, Qwen3 q/k norms, Mistral; tiny random models plus SmolLM2's real weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from model_parity import assert_logits_match, hf_logits, our_logits
from tiny_models import ours_from_hf, tiny_hf_model

from compiled_serve.errors import ModelLoadError
from compiled_serve.models.config import ModelConfig
from compiled_serve.models.layers import rope_inv_freq
from compiled_serve.models.loaders.base import build_empty_module

IDS = torch.randint(0, 256, (17,), generator=torch.Generator().manual_seed(0))

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1), (8, 2)])
def test_tiny_random_models_match(kind: str, heads: int, kv_heads: int) -> None:
    hf = tiny_hf_model(kind, num_attention_heads=heads, num_key_value_heads=kv_heads)
    ours = ours_from_hf(hf)
    assert type(ours).__name__ == type(hf).__name__
    assert_logits_match(our_logits(ours, IDS), hf_logits(hf, IDS))


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_lm_head(tied: bool) -> None:
    hf = tiny_hf_model("llama", tie_word_embeddings=tied)
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tied
    ours = ours_from_hf(hf)
    assert (ours.lm_head is None) == tied
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    assert_logits_match(our_logits(ours, IDS), hf_logits(hf, IDS))


def test_llama3_rope_scaling_at_long_positions() -> None:
    hf = tiny_hf_model("llama", rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), max_position_embeddings=4096)
    ours = ours_from_hf(hf)
    assert ours.config.rope_scaling == LLAMA3_ROPE
    # Our inverse frequencies equal transformers' own llama3 computation.
    assert torch.equal(ours.model.rotary_emb.inv_freq, hf.model.rotary_emb.inv_freq)
    positions = torch.arange(3000, 3000 + len(IDS))
    ref = hf_logits(hf, IDS, positions)
    assert_logits_match(our_logits(ours, IDS, positions), ref)
    # ... and the scaling really matters there: without it the logits move.
    plain = ours_from_hf(tiny_hf_model("llama", rope_theta=500000.0, max_position_embeddings=4096))
    assert (our_logits(plain, IDS, positions) - ref).abs().max() > 1e-3


def test_rope_inv_freq_survives_dtype_and_meta_materialization() -> None:
    config = ModelConfig.from_hf(tiny_hf_model("llama", rope_scaling=dict(LLAMA3_ROPE)).config)
    module = build_empty_module(config, torch.bfloat16, torch.device("cpu"))
    inv_freq = module.model.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float32
    assert torch.equal(inv_freq, rope_inv_freq(16, config.rope_theta, LLAMA3_ROPE))


def test_positions_are_honoured() -> None:
    # Same tokens at shifted positions: RoPE is relative, so logits agree with HF's shifted run.
    hf = tiny_hf_model("qwen3")
    ours = ours_from_hf(hf)
    positions = torch.arange(100, 100 + len(IDS))
    assert_logits_match(our_logits(ours, IDS, positions), hf_logits(hf, IDS, positions))


def test_bfloat16_close_to_fp32_reference() -> None:
    hf = tiny_hf_model("llama")
    ours = ours_from_hf(hf, dtype=torch.bfloat16)
    ref = hf_logits(hf, IDS)
    out = our_logits(ours, IDS)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def _smollm2_as(hf_smollm2: Any, kind: str) -> tuple[Any, Any]:
    """SmolLM2's real weights in an HF `kind` model (Qwen2 gets random q/k/v biases), and ours."""
    import transformers
    from transformers.initialization import no_init_weights

    c = hf_smollm2.config
    shapes = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                  num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
                  rope_theta=c.rope_parameters["rope_theta"], max_position_embeddings=c.max_position_embeddings,
                  tie_word_embeddings=True)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**shapes)
        model_cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.MistralConfig(**shapes, head_dim=c.head_dim, sliding_window=None)
        model_cls = transformers.MistralForCausalLM
    config._attn_implementation = "eager"
    with no_init_weights():
        hf = model_cls(config).eval()
    state = dict(hf_smollm2.state_dict())
    if kind == "qwen2":
        g = torch.Generator().manual_seed(0)
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                state[name] = torch.randn(p.shape, generator=g) * 0.1
    missing = hf.load_state_dict(state, strict=False).missing_keys
    assert missing in ([], ["lm_head.weight"])
    hf.tie_weights()
    ours = build_empty_module(ModelConfig.from_hf(config), torch.float32, torch.device("cpu"))
    ours.load_weights(state.items())
    return hf, ours


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_smollm2_weights_in_qwen2_and_mistral(hf_smollm2: Any, prompt_ids: list, kind: str) -> None:
    hf, ours = _smollm2_as(hf_smollm2, kind)
    assert type(ours).__name__ == type(hf).__name__
    ids = max(prompt_ids, key=len)  # one prompt: a 135M forward is ~1 s on a shared CI core
    assert_logits_match(our_logits(ours, ids), hf_logits(hf, ids))


def test_load_weights_names_missing_and_unexpected_tensors() -> None:
    hf = tiny_hf_model("llama")
    state = dict(hf.state_dict())
    config = ModelConfig.from_hf(hf.config)

    module = build_empty_module(config, torch.float32, torch.device("cpu"))
    partial = {k: v for k, v in state.items() if ".1.self_attn.k_proj." not in k and "lm_head" not in k}
    with pytest.raises(ModelLoadError, match=r"lacks 2 tensor\(s\).*lm_head.weight.*layers\.1\.self_attn\.k_proj\.weight"):
        module.load_weights(partial.items())

    extra = {**state, "model.layers.0.mlp.experts.0.weight": torch.zeros(1), "model.vision.weight": torch.zeros(1)}
    with pytest.raises(ModelLoadError, match=r"2 tensor\(s\) that LlamaForCausalLM does not use: .*experts"):
        module.load_weights(extra.items())

    bad = {**state, "model.layers.0.self_attn.v_proj.weight": torch.zeros(3, 64)}
    with pytest.raises(ModelLoadError, match=r"v_proj.weight.*shard 'v' has shape \(3, 64\), expected \(32, 64\)"):
        module.load_weights(bad.items())
