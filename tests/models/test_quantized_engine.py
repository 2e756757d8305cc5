"""A Q4_0 GGUF through the engine: served quantized with --quantization auto on the CPU (op counts),
and its greedy text and logits against the plain fp32 model on the file's dequantized weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import tiny_hf_model, write_tiny_gguf

from compiled_serve.config import EngineConfig
from compiled_serve.engine.llm_engine import LLMEngine
from compiled_serve.models.loader import load_model
from compiled_serve.outputs import RequestOutput
from compiled_serve.sampling_params import SamplingParams

NUM_LAYERS = 2
PROMPTS = [[1, 5, 9, 200, 17], [3, 3, 3], [250, 100, 7, 7, 8, 9, 60]]
NEW_TOKENS = 16
# Logit tolerance of the int4 path (bf16 activations and scales in torch's kernel) against fp32 on
# the same dequantized weights, as a fraction of the largest reference logit. Measured on this
# model: 0.36-0.40% (max |diff| ~0.0022 at a logit scale ~0.6); the gap that makes a greedy choice
# "clear" is twice the tolerance in logits.
INT4_REL_TOL = 0.01


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory: pytest.TempPathFactory) -> str:
    import gguf

    path = str(tmp_path_factory.mktemp("q4") / "tiny-q4_0.gguf")
    q4 = gguf.GGMLQuantizationType.Q4_0
    hf = tiny_hf_model("llama", max_position_embeddings=256)
    write_tiny_gguf(path, hf, "llama", {"attn_q.": q4, "attn_k.": q4, "attn_v.": q4, "attn_output.": q4,
                                        "ffn_": q4})
    return path


def _engine(path: str, **config: Any) -> LLMEngine:
    fields: dict[str, Any] = dict(model=path, dtype="float32", compile_mode="graph", num_kv_blocks=64,
                                  max_num_seqs=4, build_cache=False)
    fields.update(config)
    return LLMEngine(EngineConfig(**fields))


def _greedy(engine: LLMEngine) -> tuple[list[list[int]], dict[str, list[torch.Tensor]]]:
    logits: dict[str, list[torch.Tensor]] = {}

    def record(seqs: list, rows: torch.Tensor) -> None:
        for seq, row in zip(seqs, rows):
            logits.setdefault(seq.request_id, []).append(row.float().clone())

    engine.step_runner.on_logits = record
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params, output_kind="final")
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return [list(done[str(i)].outputs[0].token_ids) for i in range(len(PROMPTS))], logits


@pytest.fixture(scope="module")
def quantized_engine(q4_gguf: str) -> LLMEngine:
    return _engine(q4_gguf, quantization="auto")


def test_auto_serves_a_q4_gguf_quantized_on_the_cpu(quantized_engine: LLMEngine) -> None:
    engine = quantized_engine
    assert engine.quantization == "gguf" and engine.build_key.quantization == "gguf"
    graph = engine.compile_report.graphs[0]
    # qkv, o, gate_up and down in each layer become the int4 op; no float linear is left.
    assert graph["matches"]["quantized-linear"] == 4 * NUM_LAYERS
    assert graph["ops_after"].get("int4_linear", 0) == 4 * NUM_LAYERS
    assert not any("linear" in op and "int4" not in op for op in graph["ops_after"]), graph["ops_after"]
    # No float copy of a linear weight is kept: each is a placeholder that owns no memory.
    for name, p in engine.model.named_parameters():
        if name.endswith("proj.weight"):
            assert p.stride() == (0, 0) and p.quantized_weight.layout == "int4", name


@pytest.fixture(scope="module")
def plain_engine(q4_gguf: str) -> LLMEngine:
    return _engine(q4_gguf, quantization="none")


def test_an_explicit_none_serves_the_dequantized_weights(plain_engine: LLMEngine) -> None:
    assert plain_engine.quantization == "none"
    assert "quantized-linear" not in plain_engine.compile_report.graphs[0]["matches"]


def test_greedy_text_and_logits_agree_with_the_dequantized_fp32_model(quantized_engine: LLMEngine,
                                                                      q4_gguf: str) -> None:
    tokens, logits = _greedy(quantized_engine)
    reference = load_model(q4_gguf, dtype=torch.float32, device="cpu").module  # plain PyTorch, fp32
    for i, (prompt, out) in enumerate(zip(PROMPTS, tokens)):
        seq = torch.tensor(prompt + out)
        with torch.inference_mode():
            ref = reference.compute_logits(reference(seq, torch.arange(len(seq))))  # [T, vocab]
        ref_steps = ref[len(prompt) - 1 : len(seq) - 1]  # the logits that chose each output token
        ours = torch.stack(logits[str(i)])
        tol = INT4_REL_TOL * float(ref_steps.abs().max())
        assert float((ours - ref_steps).abs().max()) <= tol, f"prompt {i}"
        # Near-tie rule: wherever the reference's top-2 gap is clear, the greedy token is its argmax.
        top2 = ref_steps.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
        assert clear.sum() >= len(out) // 3, "too few clear steps for the check to mean anything"
        assert torch.equal(ref_steps.argmax(-1)[clear], torch.tensor(out)[clear]), f"prompt {i}"


def test_the_quantized_model_holds_a_fraction_of_the_float_bytes(quantized_engine: LLMEngine,
                                                                 q4_gguf: str) -> None:
    float_model = load_model(q4_gguf, dtype=torch.float32, device="cpu").module
    linear = sum(p.numel() * 4 for n, p in float_model.named_parameters() if n.endswith("proj.weight"))
    quantized = sum(p.quantized_weight.nbytes() for n, p in quantized_engine.model.named_parameters()
                    if n.endswith("proj.weight"))
    assert quantized <= 0.2 * linear  # 4-bit codes + bf16 scale and zero per 32: ~0.16x of fp32


def test_the_build_key_tells_quantized_and_plain_builds_apart(quantized_engine: LLMEngine,
                                                              plain_engine: LLMEngine) -> None:
    quantized, plain = quantized_engine.build_key, plain_engine.build_key
    assert quantized.digest() != plain.digest()
    assert {"weight_fingerprint", "passes", "quantization"} <= set(quantized.diff(plain))


@pytest.mark.parametrize("mode", ["graph", pytest.param("inductor", marks=pytest.mark.heavy)])
def test_a_quantized_engine_through_the_build_cache_keeps_its_int4_ops(
        q4_gguf: str, mode: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start that records a build (the AOT compile) and a warm start from it generate the
    uncached engine's greedy tokens. Before the fix, the recording start's pass saw no quantized
    weight (AOT-captured placeholders carry no grapharg) and multiplied by the zero placeholders,
    and the warm start loaded that step: one token over and over."""
    from compiled_serve.startup import start_engine

    monkeypatch.setenv("COMPILED_SERVE_CACHE_ROOT", str(tmp_path / "cache"))
    fields = dict(model=q4_gguf, dtype="float32", compile_mode=mode, num_kv_blocks=64, max_num_seqs=4,
                  quantization="gguf")
    want, _ = _greedy(_engine(q4_gguf, **{**fields, "build_cache": False}))
    cold = start_engine(EngineConfig(**fields), spinner=False)
    assert cold.build_status is not None and not cold.build_status.loaded
    assert cold.compile_report.graphs[0]["matches"]["quantized-linear"] == 4 * NUM_LAYERS
    assert _greedy(cold)[0] == want
    warm = start_engine(EngineConfig(**fields), spinner=False)
    assert warm.build_status is not None and warm.build_status.loaded
    assert _greedy(warm)[0] == want
