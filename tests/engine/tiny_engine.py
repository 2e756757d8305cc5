"""A tiny random-weight Llama (2 layers, hidden 64) for engine tests that do not need real text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compiled_serve.config import EngineConfig
from compiled_serve.engine.llm_engine import LLMEngine

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "eos_token_id": 255,
}


def tiny_config_path(directory: Path) -> str:
    path = directory / "tiny-llama.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return str(path)


def tiny_engine(directory: Path, **config: Any) -> LLMEngine:
    fields: dict[str, Any] = dict(model=tiny_config_path(directory), load_format="dummy", dtype="float32",
                                  compile_mode="graph", num_kv_blocks=128, max_num_seqs=32)
    fields.update(config)
    return LLMEngine(EngineConfig(**fields))
