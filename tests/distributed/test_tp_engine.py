"""The engine with tensor_parallel_size=2 (rank 0 in this process, one gloo worker process) gives
TP=1's greedy tokens, and logits within 2e-5 (fp32), through prefix caching, preemption and n>1;
a dead worker fails the engine with a clear error; shutdown leaves no process behind."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from compiled_serve.config import EngineConfig
from compiled_serve.engine.llm_engine import LLMEngine
from compiled_serve.engine.tp_engine import TensorParallelWorkerError
from compiled_serve.errors import InvalidParameterError
from compiled_serve.sampling_params import SamplingParams

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5}
TINY_QWEN3 = {**TINY_LLAMA, "architectures": ["Qwen3ForCausalLM"], "num_key_value_heads": 1,
              "tie_word_embeddings": True}


def _config_file(tmp_path_factory, name: str, cfg: dict) -> str:
    path = tmp_path_factory.mktemp(name) / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _engine(model: str, tp: int, **overrides) -> LLMEngine:
    options = dict(model=model, load_format="dummy", compile_mode="graph", num_kv_blocks=64, block_size=8,
                   max_num_seqs=8, max_num_batched_tokens=64, tensor_parallel_size=tp)
    return LLMEngine(EngineConfig(**{**options, **overrides}))


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[dict, list]:
    logits: list[torch.Tensor] = []
    engine.step_runner.on_logits = lambda seqs, x: logits.append(x.clone())
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params, output_kind="final")
    out = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] = [c.token_ids for c in o.outputs]
    return out, logits


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13], [200, 17, 5]]  # shared prefix


@pytest.fixture(scope="module", params=["llama", "qwen3-kv1"])
def tiny(request, tmp_path_factory):
    return _config_file(tmp_path_factory, request.param, TINY_LLAMA if request.param == "llama" else TINY_QWEN3)


def test_tp2_engine_gives_tp1_tokens_and_logits(tiny):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2)
    long = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    one = _engine(tiny, 1)
    want, want_logits = _run(one, PROMPTS, greedy)
    want_p, _ = _run(one, PROMPTS, long)
    two = _engine(tiny, 2)
    try:
        got, got_logits = _run(two, PROMPTS, greedy)
        assert got == want
        assert len(got_logits) == len(want_logits)
        for a, b in zip(got_logits, want_logits):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
        assert two.get_stats().prefix_cache_hits > 0  # the second prompt reused the first's blocks
    finally:
        two.shutdown()
    assert all(p.poll() is not None for p in two.tp.workers)
    # Preemption (one TP engine per process at a time): a pool too small for every sequence at once.
    cramped = _engine(tiny, 2, num_kv_blocks=6, max_num_seqs=4)
    try:
        got_p, _ = _run(cramped, PROMPTS, long)
        assert cramped.scheduler.num_preemptions > 0
    finally:
        cramped.shutdown()
    assert got_p == want_p


def test_killed_worker_fails_the_engine_cleanly(tmp_path_factory):
    engine = _engine(_config_file(tmp_path_factory, "llama-kill", TINY_LLAMA), 2)
    try:
        worker = engine.tp.workers[0]
        engine.add_request("a", PROMPTS[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        engine.step()
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        with pytest.raises(TensorParallelWorkerError, match="rank 1 .* exited"):
            for _ in range(60):
                engine.step()
        with pytest.raises(TensorParallelWorkerError):  # failed for good, not retried
            engine.step()
    finally:
        engine.shutdown()
    assert all(p.poll() is not None for p in engine.tp.workers)


def test_indivisible_heads_are_an_invalid_parameter(tmp_path_factory):
    path = _config_file(tmp_path_factory, "nine-heads", {**TINY_LLAMA, "num_attention_heads": 9, "hidden_size": 144,
                                                         "num_key_value_heads": 3})
    with pytest.raises(InvalidParameterError, match=r"tensor_parallel_size.*num_heads \(9\)"):
        _engine(path, 2)


@pytest.mark.heavy
def test_tp2_inductor_engine_gives_tp1_tokens(tmp_path_factory):
    """The default compile mode: Inductor compiles the sharded graph, collectives included (C++ on
    the CPU, gloo underneath); tokens are TP=1's, logits within 2e-5 (~90 s on 2 cores)."""
    path = _config_file(tmp_path_factory, "llama-inductor", TINY_LLAMA)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want, want_logits = _run(_engine(path, 1), PROMPTS, greedy)
    engine = _engine(path, 2, compile_mode="inductor", build_cache=False)
    try:
        got, got_logits = _run(engine, PROMPTS, greedy)
    finally:
        engine.shutdown()
    assert got == want
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def test_offline_llm_takes_vllm_s_tensor_parallel_size(tmp_path_factory):
    from compiled_serve import LLM

    path = _config_file(tmp_path_factory, "llama-llm", TINY_LLAMA)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(path, load_format="dummy", compile_mode="graph",
                                                  num_kv_blocks=64, build_cache=False).generate(PROMPTS, greedy)]
    llm = LLM(path, load_format="dummy", compile_mode="graph", num_kv_blocks=64, build_cache=False,
              tensor_parallel_size=2)
    try:
        assert llm.llm_engine.startup_report()["kv_cache_blocks"] == 64
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)] == want
    finally:
        llm.llm_engine.shutdown()
    assert all(p.poll() is not None for p in llm.llm_engine.tp.workers)


def test_a_worker_that_dies_before_joining_is_a_quick_clear_error(tmp_path_factory, monkeypatch):
    import time

    import compiled_serve.engine.tp_engine as tp_engine

    monkeypatch.setattr(tp_engine, "WORKER_MODULE", "compiled_serve.engine.no_such_worker")
    start = time.monotonic()
    with pytest.raises(TensorParallelWorkerError, match="rank 1 exited with code 1 before joining"):
        _engine(_config_file(tmp_path_factory, "llama-nojoin", TINY_LLAMA), 2)
    assert time.monotonic() - start < 30  # not the rendezvous timeout
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_a_killed_engine_process_leaves_no_worker_behind(tmp_path_factory):
    """The engine's process dies without a shutdown (SIGKILL: no atexit, no finalizer): its worker
    dies with it (PR_SET_PDEATHSIG; its closed pair sockets would end it too) instead of lingering."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    path = _config_file(tmp_path_factory, "llama-orphan", TINY_LLAMA)
    script = (
        "import time\n"
        "from compiled_serve.config import EngineConfig\n"
        "from compiled_serve.engine.llm_engine import LLMEngine\n"
        f"e = LLMEngine(EngineConfig(model={path!r}, load_format='dummy', compile_mode='graph', num_kv_blocks=64, "
        "block_size=8, max_num_seqs=8, max_num_batched_tokens=64, tensor_parallel_size=2, build_cache=False))\n"
        "print(e.tp.workers[0].pid, flush=True)\n"
        "time.sleep(600)\n")
    engine = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert engine.stdout is not None
        worker = int(engine.stdout.readline())
    finally:
        engine.kill()
        engine.wait()

    def gone() -> bool:
        try:
            stat = Path(f"/proc/{worker}/stat").read_text()
        except OSError:
            return True
        return stat.rsplit(")", 1)[1].split()[0] == "Z"  # dead, waiting for init to reap it

    deadline = time.monotonic() + 15
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(), f"worker {worker} outlived its engine"
