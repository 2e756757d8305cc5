"""`kv_cache_dtype="fp8"` (vLLM's --kv-cache-dtype): the config and device checks on the CPU, and on
CUDA an engine whose cache is e4m3, against the same engine with the model's dtype."""

from __future__ import annotations

import pytest
import torch
from tiny_engine import tiny_engine

from compiled_serve.config import EngineConfig
from compiled_serve.errors import InvalidParameterError
from compiled_serve.sampling_params import SamplingParams


def test_an_unknown_kv_cache_dtype_is_refused() -> None:
    with pytest.raises(InvalidParameterError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int8")


def test_fp8_on_the_cpu_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(InvalidParameterError, match="kv_cache_dtype.*CUDA"):
        tiny_engine(tmp_path, device="cpu", kv_cache_dtype="fp8")


def test_the_cli_takes_the_flag_and_lists_its_choices() -> None:
    from compiled_serve.cli import build_parser

    args = build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8_e4m3"])
    assert args.kv_cache_dtype == "fp8_e4m3"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-dtype", "int8"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="an e4m3 KV cache needs an sm89+ CUDA device")
def test_an_fp8_cache_holds_twice_the_tokens_and_greedy_text_follows_the_bf16_cache(tmp_path) -> None:
    fields = dict(device="cuda", dtype="bfloat16", compile_mode="inductor", num_kv_blocks=None,
                  gpu_memory_utilization=0.3, max_num_seqs=8, max_num_batched_tokens=256)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    prompts = [list(range(1, 40)), list(range(7, 100, 3))]
    runs = {}
    for kv in ("auto", "fp8"):
        (tmp_path / kv).mkdir()
        engine = tiny_engine(tmp_path / kv, **fields, kv_cache_dtype=kv)
        assert engine.kv_caches[0].dtype == (torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16)
        assert engine.startup_report()["kv_cache_dtype"] == ("float8_e4m3fn" if kv == "fp8" else "bfloat16")
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        outs = [done[f"r{i}"] for i in range(len(prompts))]
        runs[kv] = (engine.block_manager.num_blocks, outs)
        del engine
        torch.cuda.empty_cache()
    blocks_bf16, bf16 = runs["auto"]
    blocks_fp8, fp8 = runs["fp8"]
    assert blocks_fp8 >= 1.9 * blocks_bf16  # one byte a value instead of two
    # e4m3 rounds K/V to 6% steps, so a near tie of the random tiny model may flip, and the text
    # after it differs; a broken cache (zeros, NaN, the wrong scale) disagrees from the first token.
    same = [sum(x == y for x, y in zip(a.outputs[0].token_ids, b.outputs[0].token_ids)) for a, b in zip(bf16, fp8)]
    assert max(same) >= 12 and sum(same) >= 16, same
