"""GGUF loading against transformers' own GGUF path (dequantize + un-permute) and the originals."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
from model_parity import assert_logits_match, hf_logits, our_logits
from tiny_models import tiny_hf_model, write_tiny_gguf

from compiled_serve.models.config import ModelConfig
from compiled_serve.models.layers import rope_inv_freq
from compiled_serve.models.loader import load_model
from compiled_serve.models.loaders.base import file_fingerprint


def hf_names_of_ours(module: Any) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face names (packed projections split back)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in module.state_dict().items():
        if ".qkv_proj." in name:
            qkv = module.get_submodule(name.rsplit(".", 1)[0])
            for part, t in zip("qkv", p.split([qkv.q_size, qkv.kv_size, qkv.kv_size])):
                out[name.replace(".qkv_proj.", f".{part}_proj.")] = t
        elif ".gate_up_proj." in name:
            gate, up = p.chunk(2)
            out[name.replace(".gate_up_proj.", ".gate_proj.")] = gate
            out[name.replace(".gate_up_proj.", ".up_proj.")] = up
        else:
            out[name] = p
    return out


def test_smollm2_logits_match_transformers(our_smollm2: Any, hf_smollm2: Any, prompt_ids: list) -> None:
    # Two prompts (the shortest and the longest): a 135M forward takes seconds on a shared CI core.
    for ids in (min(prompt_ids, key=len), max(prompt_ids, key=len)):
        assert_logits_match(our_logits(our_smollm2.module, ids), hf_logits(hf_smollm2, ids))


def test_smollm2_weights_equal_transformers_dequantized(our_smollm2: Any, hf_smollm2: Any) -> None:
    # The file holds Q4_1 projections, a Q8_0 embedding and F32 norms; transformers dequantizes
    # with the same gguf kernels and un-permutes q/k itself, so every tensor must be bit-equal.
    ours = hf_names_of_ours(our_smollm2.module)
    ref = {k: v for k, v in hf_smollm2.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(ours) == set(ref)
    unequal = [k for k in ref if not torch.equal(ours[k], ref[k])]
    assert not unequal, unequal[:5]


def test_smollm2_metadata(our_smollm2: Any, smollm2_gguf: str) -> None:
    import transformers

    config = our_smollm2.config
    assert (config.architecture, config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
        "LlamaForCausalLM", 30, 576, 9, 3)
    assert config.tie_word_embeddings and our_smollm2.module.lm_head is None
    assert config.eos_token_ids == (2,) and config.bos_token_id == 1
    assert our_smollm2.source == f"gguf:{smollm2_gguf} (Q4_1, dequantized)"
    assert re.fullmatch(r"[0-9a-f]{64}", our_smollm2.weight_fingerprint)
    assert our_smollm2.weight_fingerprint == file_fingerprint([smollm2_gguf])
    tok = our_smollm2.tokenizer
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert our_smollm2.chat_template and tok.chat_template == our_smollm2.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert not our_smollm2.module.training
    assert all(not p.requires_grad for p in our_smollm2.module.parameters())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_matches_transformers_and_original(tmp_path: Any, arch: str) -> None:
    """Untied output, several GGML types; per arch the q/k permutation (llama), biases (qwen2),
    q/k norms (qwen3). Our dequantized tensors equal transformers' bit for bit, F32 ones equal the
    original model's, and logits match transformers on the same file."""
    import gguf
    import transformers.utils.logging as hf_logging
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from compiled_serve.models.loaders.gguf_file import gguf_config, iter_gguf_weights, open_gguf

    hf_logging.disable_progress_bar()
    Q = gguf.GGMLQuantizationType
    original = tiny_hf_model(arch, head_dim=16)
    qtypes = {"attn_q.": Q.F32, "attn_k.": Q.F32, "attn_v.": Q.Q8_0, "attn_output": Q.Q4_0,
              "ffn_gate": Q.Q4_1, "ffn_up": Q.F16, "ffn_down": Q.BF16, "token_embd": Q.Q8_0, "output.": Q.F16}
    path = str(tmp_path / f"tiny-{arch}.gguf")
    write_tiny_gguf(path, original, arch, qtypes)

    hf_config = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path)
    hf_config._attn_implementation = "eager"
    hf_config.head_dim = 16  # transformers' GGUF config mapping drops qwen3.attention.key_length
    reference = AutoModelForCausalLM.from_config(hf_config).eval()
    hf_state = load_gguf_checkpoint(path, return_tensors=True, model_to_load=reference)["tensors"]
    assert not reference.load_state_dict(hf_state, strict=False).unexpected_keys

    reader = open_gguf(path)
    config = gguf_config(reader)
    assert config.architecture == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                   "qwen3": "Qwen3ForCausalLM"}[arch]
    ours = dict(iter_gguf_weights(reader, config))
    assert set(ours) == set(hf_state)
    for name, tensor in ours.items():
        assert torch.equal(tensor, hf_state[name].float()), name
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert torch.equal(ours[name], original.state_dict()[name])  # F32: permutation undone exactly

    loaded = load_model(path, dtype=torch.float32, device="cpu")
    assert loaded.tokenizer is None and not loaded.config.tie_word_embeddings
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(1))
    assert_logits_match(our_logits(loaded.module, ids), hf_logits(reference, ids))


def test_rope_freqs_tensor_becomes_llama3_scaling(tmp_path: Any) -> None:
    # Llama 3.1 GGUFs replace rope scaling metadata with per-frequency divisors.
    from compiled_serve.models.loaders.gguf_file import gguf_config, open_gguf

    original = tiny_hf_model("llama", rope_theta=500000.0)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    divisors = (rope_inv_freq(16, 500000.0, None) / rope_inv_freq(16, 500000.0, scaling)).numpy()
    assert not np.allclose(divisors, 1.0)
    path = str(tmp_path / "rope.gguf")
    write_tiny_gguf(path, original, "llama", {}, extra_tensors={"rope_freqs.weight": divisors})
    config = gguf_config(open_gguf(path))
    assert config.rope_scaling == scaling
    assert isinstance(config, ModelConfig)
    module = load_model(path, dtype=torch.float32, device="cpu").module
    assert torch.equal(module.model.rotary_emb.inv_freq, rope_inv_freq(16, 500000.0, scaling))


def test_lean_reader_agrees_with_gguf_reader(tmp_path: Any) -> None:
    """Our GGUF parser vs the gguf package's on every metadata type and several tensor types."""
    import gguf

    from compiled_serve.models.loaders.gguf_reader import GGUFFile, StringArray

    Q = gguf.GGMLQuantizationType
    path = str(tmp_path / "types.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("t.u8", 7)
    writer.add_int16("t.i16", -3)
    writer.add_uint32("t.u32", 4000000000)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float32("t.f32", 1e-5)
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo {% template %}")
    writer.add_array("t.strs", ["a", "bc", "", "ü" * 300])
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.floats", [0.5, 1.5])
    rng = np.random.default_rng(0)
    for i, qtype in enumerate([Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]):
        w = rng.standard_normal((3 + i, 64)).astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(f"w{i}", w)
        elif qtype == Q.F16:
            writer.add_tensor(f"w{i}", w.astype(np.float16))
        else:
            writer.add_tensor(f"w{i}", gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.add_tensor("bias", rng.standard_normal(5).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert set(ours.metadata) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for key, value in ours.metadata.items():
        expected = ref.fields[key].contents()
        if isinstance(value, StringArray):
            assert len(value) == len(expected)
        elif isinstance(value, np.ndarray):
            assert value.tolist() == expected
        else:
            assert value == expected and type(value) is type(expected), key
    assert ours.metadata["t.strs"] == StringArray(4) and ours.metadata["t.str"] == "héllo {% template %}"
    assert len(ours.tensors) == len(ref.tensors) == 7
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.name, a.tensor_type, a.shape) == (b.name, b.tensor_type, tuple(int(d) for d in b.shape))
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)
        assert np.array_equal(gguf.quants.dequantize(a.data, a.tensor_type), gguf.quants.dequantize(b.data, b.tensor_type))
