"""The warm-up runs a grammar-constrained request, so the masked sampler tail (a bitmask, with and
without penalties beside it) is compiled before "ready": a constrained load afterwards compiles
no dynamo frame, on the CPU, and on CUDA no Triton kernel either (that variant skips without CUDA).

A tiny random-weight Llama with SmolLM2's tokenizer (a grammar needs a real tokenizer) starts in
seconds; its output is checked against the constraint, so the masked path really ran.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tiny_engine import TINY_LLAMA

from compiled_serve.config import EngineConfig
from compiled_serve.engine.llm_engine import LLMEngine
from compiled_serve.sampling_params import SamplingParams
from compiled_serve.structured import StructuredOutputsParams

REGEX = "[a-z]{2,6}( [a-z]{2,6}){0,3}"
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["n"], "additionalProperties": False}


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (counters["frames"] stays empty in this torch)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _engine(tmp_path: Path, tokenizer, **config) -> LLMEngine:
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(str(tokenizer_dir))
    model = tmp_path / "tiny-llama-smollm2-vocab.json"
    model.write_text(json.dumps({**TINY_LLAMA, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id}))
    fields = dict(model=str(model), load_format="dummy", dtype="float32", compile_mode="graph", num_kv_blocks=64,
                  max_num_seqs=8, tokenizer=str(tokenizer_dir))
    fields.update(config)
    return LLMEngine(EngineConfig(**fields))


def _constrained_load(engine: LLMEngine) -> None:
    """Constrained rows alone, beside penalised and plain rows, greedy and sampled, with logprobs."""
    regex = StructuredOutputsParams(regex=REGEX)
    schema = StructuredOutputsParams(json=SCHEMA)
    requests = {
        "regex": SamplingParams(max_tokens=40, temperature=0.9, seed=1, structured_outputs=regex),
        "schema": SamplingParams(max_tokens=24, temperature=0, structured_outputs=schema, logprobs=2),
        "penalised": SamplingParams(max_tokens=6, ignore_eos=True, repetition_penalty=1.2),
        "plain": SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.7, top_k=5),
        "both": SamplingParams(max_tokens=40, frequency_penalty=0.5, structured_outputs=regex),
    }
    done: dict[str, tuple[str, str | None]] = {}
    # Alone and together: a tail row count of one keeps strides that a batch does not.
    for batch in (["regex"], ["schema", "penalised", "plain", "both"], ["penalised"], ["both"]):
        for name in batch:
            engine.add_request(name, "Say something", requests[name])
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    done[output.request_id] = (output.outputs[0].text, output.outputs[0].finish_reason)
    for name in ("regex", "both"):
        assert done[name][1] == "stop" and re.fullmatch(REGEX, done[name][0]), done[name]
    assert done["schema"][1] == "stop" and 0 <= json.loads(done["schema"][0])["n"] <= 99, done["schema"]


def test_nothing_compiles_after_ready_for_constrained_requests(tmp_path: Path, smollm2_tokenizer) -> None:
    before = compiled_graphs()
    engine = _engine(tmp_path, smollm2_tokenizer)
    ready = compiled_graphs()
    assert ready > before  # the counter sees this engine's compiles
    _constrained_load(engine)
    assert compiled_graphs() == ready


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nothing_compiles_after_ready_for_constrained_requests_on_cuda(tmp_path: Path, smollm2_tokenizer) -> None:
    import triton

    hook_owner = getattr(getattr(triton, "knobs", None), "runtime", None)
    if hook_owner is None or not hasattr(hook_owner, "jit_post_compile_hook"):
        pytest.skip("this triton has no jit_post_compile_hook")
    engine = _engine(tmp_path, smollm2_tokenizer, device="cuda", compile_mode="inductor", num_kv_blocks=256,
                     max_num_batched_tokens=256)
    compiled: list = []
    hook_owner.jit_post_compile_hook = lambda *a, **k: compiled.append(k.get("fn", a))
    ready = compiled_graphs()
    try:
        _constrained_load(engine)
    finally:
        hook_owner.jit_post_compile_hook = None
    assert compiled == []
    assert compiled_graphs() == ready
