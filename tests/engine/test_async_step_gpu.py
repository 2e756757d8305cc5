"""The asynchronous step path on CUDA: no host sync inside a step, and nothing compiles after ready.

Both need a GPU (sync debug mode and Triton compilation exist only there); they skip without one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_engine import tiny_engine

from compiled_serve.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _gpu_engine(tmp_path: Path, **config):
    fields = dict(device="cuda", compile_mode="inductor", num_kv_blocks=512, max_num_seqs=16,
                  max_num_batched_tokens=256)
    fields.update(config)
    return tiny_engine(tmp_path, **fields)


def _mixed_requests(engine, tag: str) -> None:
    """Greedy, seeded sampling, top-k/p, logprobs and a penalty, with prompts long and short."""
    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=1, max_tokens=20, ignore_eos=True, n=2),
        SamplingParams(temperature=0, max_tokens=16, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0.7, max_tokens=12, repetition_penalty=1.2, ignore_eos=True),
    ]
    for i, p in enumerate(params):
        engine.add_request(f"{tag}{i}", list(range(1, 30 + 61 * i)), p)


def test_step_launch_never_syncs_with_the_host(tmp_path):
    """Every launch runs under sync debug mode "error": any implicit sync (a .tolist(), .item(), a
    blocking copy, a boolean-mask index) raises. Only `InFlightStep.wait()` may wait."""
    engine = _gpu_engine(tmp_path)
    _mixed_requests(engine, "s")
    original = engine._launch

    def checked_launch(*args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(*args)
        finally:
            torch.cuda.set_sync_debug_mode(0)


    engine._launch = checked_launch
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.runner.num_graph_steps > 0  # the decode-graph replay ran under the check too


def test_nothing_compiles_after_ready(tmp_path):
    """A mixed load after ready (prefills, full-budget chunks, decodes at several batch sizes, both
    tail variants, logprobs) compiles no dynamo frame and no Triton kernel."""
    import triton

    engine = _gpu_engine(tmp_path)
    compiled = []
    hook_owner = getattr(getattr(triton, "knobs", None), "runtime", None)
    if hook_owner is None or not hasattr(hook_owner, "jit_post_compile_hook"):
        pytest.skip("this triton has no jit_post_compile_hook")
    hook_owner.jit_post_compile_hook = lambda *a, **k: compiled.append(k.get("fn", a))
    from torch._dynamo.utils import counters

    # Not counters["frames"]: fullgraph compiles never count there, so it stays empty.
    graphs_before = counters["stats"]["unique_graphs"]
    try:
        _mixed_requests(engine, "w")
        engine.add_request("long", list(range(1, 250)) * 2, SamplingParams(max_tokens=8, ignore_eos=True))
        for i in range(13):
            engine.add_request(f"d{i}", list(range(1, 5 + i)), SamplingParams(max_tokens=6 + i, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        hook_owner.jit_post_compile_hook = None
    assert compiled == []
    assert counters["stats"]["unique_graphs"] == graphs_before


def test_async_greedy_is_bit_identical_to_sync_on_cuda(tmp_path):
    """Every request admitted at once and length-limited: both modes run the same batches, so the
    greedy (and seeded) tokens match exactly, and logprobs bit for bit."""
    results = {}
    for mode in ("sync", "async"):
        engine = _gpu_engine(tmp_path, scheduling=mode)
        for i in range(12):
            params = SamplingParams(temperature=0 if i % 2 else 0.9, seed=i, max_tokens=10 + 3 * i,
                                    ignore_eos=True, logprobs=2)
            engine.add_request(str(i), list(range(1, 20 + 9 * i)), params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = (out.outputs[0].token_ids,
                                            [sorted((t, lp.logprob) for t, lp in d.items()) for d in out.outputs[0].logprobs])
        results[mode] = done
    assert results["sync"] == results["async"]
