"""Tensor parallelism on CUDA (NCCL, one GPU per rank): TP=2 gives TP=1's greedy tokens. Needs two
GPUs; skipped cleanly without them (CPU CI covers the same paths with gloo)."""

from __future__ import annotations

import json

import pytest
import torch

from compiled_serve.config import EngineConfig
from compiled_serve.engine.llm_engine import LLMEngine
from compiled_serve.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                                  reason="needs 2 CUDA devices")]

TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5}


def _tokens(path: str, tp: int) -> dict:
    engine = LLMEngine(EngineConfig(model=path, load_format="dummy", dtype="float32", device="cuda",
                                    compile_mode="graph", num_kv_blocks=64, max_num_seqs=4,
                                    tensor_parallel_size=tp, build_cache=False))
    try:
        engine.add_request("a", [1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                           output_kind="final")
        out = {}
        while engine.has_unfinished_requests():
            out.update({o.request_id: o.outputs[0].token_ids for o in engine.step()})
        return out
    finally:
        engine.shutdown()


def test_tp2_on_two_gpus_gives_tp1_tokens(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    assert _tokens(str(path), 2) == _tokens(str(path), 1)
