"""The tensor-parallel step path with the static-buffer (CUDA-graph) steps, and TP=1 through the
worker path (distributed_executor_backend="mp": the driver, a process group of one, no worker).

CPU (gloo): TP=1 "mp" gives the in-process engine's tokens; TP=2 with the graph sets set up
without capture (what the CPU can run: the same static buffers, mirrored to the worker before
every replay) gives TP=1's tokens. GPU (skipped without CUDA): TP=1 "mp" with CUDA graphs on gives
the in-process engine's tokens, its steps replayed from graphs.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from compiled_serve.config import EngineConfig
from compiled_serve.engine.llm_engine import LLMEngine
from compiled_serve.errors import InvalidParameterError
from compiled_serve.sampling_params import SamplingParams

TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5}
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 10, 11], [200, 17, 5]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tp-graphs") / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def _engine(model: str, tp: int = 1, **overrides) -> LLMEngine:
    options = dict(model=model, load_format="dummy", compile_mode="graph", num_kv_blocks=64, block_size=8,
                   max_num_seqs=4, max_num_batched_tokens=64, tensor_parallel_size=tp, build_cache=False)
    return LLMEngine(EngineConfig(**{**options, **overrides}))


def _tokens(engine: LLMEngine, max_tokens: int = 10) -> dict:
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, greedy, output_kind="final")
    out = {}
    while engine.has_unfinished_requests():
        out.update({o.request_id: o.outputs[0].token_ids for o in engine.step()})
    return out


def test_uni_executor_takes_one_rank_only():
    with pytest.raises(InvalidParameterError, match="distributed_executor_backend"):
        EngineConfig(tensor_parallel_size=2, distributed_executor_backend="uni")


def test_tp1_through_the_worker_path_gives_the_in_process_tokens(tiny):
    in_process = _engine(tiny)
    want = _tokens(in_process)
    engine = _engine(tiny, distributed_executor_backend="mp")
    try:
        assert engine.tp is not None and engine.tp.size == 1 and engine.tp.workers == []
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert engine.build_key == in_process.build_key  # the same graphs: the same build
        assert _tokens(engine) == want
    finally:
        engine.shutdown()
    assert not dist.is_initialized()


def test_tp2_static_buffer_steps_are_mirrored_to_the_worker(tiny):
    """The graph sets' static-buffer path, as CUDA graphs replay it (uncaptured on the CPU): rank 0
    broadcasts its buffers before each replay and the worker runs the same bucket (collectives
    inside), so the tokens are TP=1's. Without the mirror the worker would wait for a STEP that
    never comes and the first decode would fail or hang."""
    want = _tokens(_engine(tiny))
    engine = _engine(tiny, 2)
    try:
        engine.runner.capture_decode_graphs([1, 2, 4], engine.max_model_len, capture=False)
        got = _tokens(engine)
        assert engine.runner.num_graph_steps > 0
        assert got == want
    finally:
        engine.shutdown()
    assert all(p.poll() is not None for p in engine.tp.workers)


def test_bench_latency_routes_through_the_worker_path(tiny, tmp_path):
    """`compiled-serve bench latency --distributed-executor-backend mp` (the W3 comparison, here on
    the tiny model): the run's engine is the driver's, and the record says so."""
    import subprocess
    import sys

    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "compiled_serve.cli", "bench", "latency", "--model", tiny, "--results-dir",
         str(results), "--dtype", "float32", "--compile-mode", "graph", "--num-kv-blocks", "64",
         "--max-num-seqs", "4", "--device", "cpu", "--max-prompt-len", "8", "--max-output-len", "4",
         "--repeats", "1", "--tensor-parallel-size", "1", "--distributed-executor-backend", "mp"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = results.glob("*.json")
    record = json.loads(path.read_text())
    settings = record["settings"]
    assert (settings["tensor_parallel_size"], settings["distributed_executor_backend"]) == (1, "mp")
    assert "tensor parallel: 1 ranks" in done.stderr  # the driver started (its log line)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tp1_worker_path_with_cuda_graphs_gives_the_in_process_tokens(tiny):
    """The lead runs this on an H200: graphs captured through the driver (mirror hooks on, NCCL
    process group of one), the same tokens as the in-process engine, steps replayed from graphs."""
    options = dict(device="cuda", dtype="float32", cuda_graph_buckets=(1, 2, 4))
    in_process = _engine(tiny, **options)
    want = _tokens(in_process)
    assert in_process.runner.num_graph_steps > 0
    del in_process
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    engine = _engine(tiny, distributed_executor_backend="mp", **options)
    try:
        assert engine.tp is not None and dist.get_backend() == "nccl"
        assert engine.runner.decode_graphs is not None and engine.runner.decode_graphs.graphs
        assert engine.runner.decode_graphs.before_replay is not None  # replays go through the driver
        assert _tokens(engine) == want
        assert engine.runner.num_graph_steps > 0
    finally:
        engine.shutdown()
