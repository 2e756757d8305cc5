"""Tiny end-to-end bench runs on the CPU: the JSON record's schema, and its floor recomputed by hand
from the record's own ceilings and PERF.md's request-drawing rule."""

from __future__ import annotations

import random
from typing import Any

import jsonschema_rs
import pytest

NUMBER = {"type": "number"}
HEADLINE = {"type": "object", "required": ["metric", "value", "floor", "pct_of_floor", "vllm"],
            "properties": {"metric": {"enum": ["out tok/s", "decode tok/s"]}, "value": NUMBER, "floor": NUMBER,
                           "pct_of_floor": NUMBER, "vllm": {"type": "null"}}}
RECORD_SCHEMA = {
    "type": "object",
    "required": ["tool", "schema", "engine", "date", "device", "gpu", "hardware", "versions", "workload", "settings",
                 "ceilings", "model_cost", "floor", "result", "headline"],
    "properties": {
        "tool": {"const": "compiled-serve bench"}, "schema": {"const": 1}, "device": {"const": "cpu"},
        "gpu": {"type": "null"}, "date": {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"},
        "versions": {"type": "object", "required": ["compiled_serve", "torch", "python"],
                     "properties": {"torch": {"type": "string"}, "python": {"type": "string"}}},
        "workload": {"type": "object", "required": ["id", "model", "num_requests", "prompt_len", "output_len",
                                                    "modified"], "properties": {"modified": {"const": True}}},
        "settings": {"type": "object", "required": ["max_num_seqs", "max_num_batched_tokens", "dtype"]},
        "ceilings": {"type": "object", "required": ["copy_gb_s", "matmul_tflop_s", "method"],
                     "properties": {"copy_gb_s": {"exclusiveMinimum": 0}, "matmul_tflop_s": {"exclusiveMinimum": 0}}},
        "floor": {"type": "object", "required": ["seconds", "decode_s", "prefill_s", "steps", "out_tok_s"]},
        "result": {"type": "object", "required": ["startup_s"]},
        "headline": HEADLINE,
    },
}
# The tiny Llama (tests/engine/tiny_engine.py), fp32, untied: 2 layers of q 64x64, k and v 64x32,
# o 64x64, gate/up/down 64x128 and two norms of 64; a final norm; embedding and lm_head 256x64.
TINY_PARAMS = 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192 + 128) + 64 + 2 * 16384
TINY_WEIGHT_BYTES = 4 * (TINY_PARAMS - 16384)
TINY_KV_BYTES = 2 * 2 * 2 * 16 * 4  # layers * (k, v) * kv heads * head_dim * fp32


def perf_md_lengths(num: int, prompt: list[int], output: list[int], vocab: int) -> tuple[list[int], list[int]]:
    rng = random.Random(0)
    prompt_lens = []
    for _ in range(num):
        prompt_lens.append(rng.randint(*prompt))
        for _ in range(prompt_lens[-1]):
            rng.randint(0, vocab - 1)
    return prompt_lens, [rng.randint(*output) for _ in range(num)]


def hand_floor(record: dict[str, Any]) -> tuple[float, float]:
    w, c = record["workload"], record["ceilings"]
    prompts, outs = perf_md_lengths(w["num_requests"], w["prompt_len"], w["output_len"], vocab=256)
    kv_reads = sum(p + j for p, o in zip(prompts, outs) for j in range(o)) * TINY_KV_BYTES
    decode_s = (kv_reads + max(outs) * TINY_WEIGHT_BYTES) / (c["copy_gb_s"] * 1e9)
    return decode_s, 2 * TINY_PARAMS * sum(prompts) / (c["matmul_tflop_s"] * 1e12)


def test_throughput_record(throughput_record: dict[str, Any]) -> None:
    jsonschema_rs.validate(RECORD_SCHEMA, throughput_record)
    r = throughput_record
    assert r["workload"]["id"] == "W1" and r["workload"]["prompt_len"] == [2, 20]
    assert r["settings"]["max_num_batched_tokens"] == 8192  # the bench default, not EngineConfig's
    assert r["model_cost"] == {"params": TINY_PARAMS, "weight_bytes": TINY_WEIGHT_BYTES,
                               "kv_bytes_per_token": TINY_KV_BYTES}
    decode_s, prefill_s = hand_floor(r)
    assert r["floor"]["decode_s"] == pytest.approx(decode_s, rel=1e-9)
    assert r["floor"]["prefill_s"] == pytest.approx(prefill_s, rel=1e-9)
    result, headline = r["result"], r["headline"]
    _, outs = perf_md_lengths(4, [2, 20], [2, 20], 256)
    assert result["output_tokens"] == sum(outs) == r["floor"]["output_tokens"]
    assert result["out_tok_s"] == pytest.approx(result["output_tokens"] / result["elapsed_s"])
    assert headline["value"] == result["out_tok_s"]
    assert headline["pct_of_floor"] == pytest.approx(100 * result["out_tok_s"] * (decode_s + prefill_s) / sum(outs))


def test_latency_record(latency_record: dict[str, Any]) -> None:
    jsonschema_rs.validate(RECORD_SCHEMA, latency_record)
    r = latency_record
    assert r["workload"]["prompt_len"] == [16, 16] and r["workload"]["output_len"] == [8, 8]
    runs = r["result"]["runs"]
    assert len(runs) == 2
    for run in runs:
        # decode tok/s leaves the first token (prefill) out: 7 tokens over E2E minus TTFT.
        assert run["decode_tok_s"] == pytest.approx(7 / (run["e2e_s"] - run["ttft_s"]))
    assert r["headline"]["metric"] == "decode tok/s"
    decode_s, _ = hand_floor(r)
    assert r["headline"]["floor"] == pytest.approx(8 / decode_s)  # 1 / the mean decode step
