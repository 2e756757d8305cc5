"""Starts through the build cache (`start_engine`, what `serve`, `chat` and `LLM()` run).

A second start of the same settings loads the stored build; a changed setting misses; the cache
can be turned off and then writes nothing; two processes starting at once leave one sound build;
a GGUF model's loaded weights come back from the cache equal to the file's. Fast tests use the
tiny dummy Llama in "graph" mode; the `heavy` ones count Inductor's own cache hits and misses in
fresh processes, and round-trip the real SmolLM2 tokenizer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_engine import tiny_config_path

from compiled_serve.cache.build_cache import BuildCache
from compiled_serve.cli import _configs, build_parser
from compiled_serve.config import EngineConfig
from compiled_serve.sampling_params import SamplingParams
from compiled_serve.startup import start_engine

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "models"))


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("COMPILED_SERVE_CACHE_ROOT", str(root))
    return root


def _config(tmp_path: Path, **overrides: Any) -> EngineConfig:
    fields: dict[str, Any] = dict(model=tiny_config_path(tmp_path), load_format="dummy", dtype="float32",
                                  compile_mode="graph", num_kv_blocks=64, max_num_seqs=8, device="cpu")
    fields.update(overrides)
    return EngineConfig(**fields)


def _greedy(engine: Any) -> list[int]:
    engine.add_request("r", [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       output_kind="final")
    while engine.has_unfinished_requests():
        outs = engine.step()
    return list(outs[0].outputs[0].token_ids)


def test_second_start_loads_the_build_and_generates_the_same(tmp_path: Path, cache_root: Path) -> None:
    first = start_engine(_config(tmp_path), spinner=False)
    assert first.build_status is not None and not first.build_status.loaded
    assert first.build_status.message.startswith("cache miss: compiled, stored as")
    assert "of 4.00 GiB in" in first.build_status.message  # the cache's size, in the summary
    (stored,) = BuildCache(cache_root).entries()
    assert stored.digest == first.build_key.digest()

    second = start_engine(_config(tmp_path), spinner=False)
    assert second.build_status is not None and second.build_status.loaded
    assert second.startup_report()["build"].startswith(f"cache hit: build {stored.digest[:12]} loaded")
    assert _greedy(first) == _greedy(second)
    assert len(BuildCache(cache_root).entries()) == 1  # a hit stores nothing new


def test_a_changed_setting_misses(tmp_path: Path, cache_root: Path) -> None:
    start_engine(_config(tmp_path), spinner=False)
    other = start_engine(_config(tmp_path, max_num_seqs=16), spinner=False)  # other decode buckets
    assert other.build_status is not None and not other.build_status.loaded
    assert len(BuildCache(cache_root).entries()) == 2


def test_no_build_cache_writes_nothing(tmp_path: Path, cache_root: Path) -> None:
    args = build_parser().parse_args(["serve", "--no-build-cache", "--model", tiny_config_path(tmp_path),
                                      "--load-format", "dummy", "--compile-mode", "graph"])
    config = _configs(args)[0]
    assert config.build_cache is False
    engine = start_engine(_config(tmp_path, build_cache=False), spinner=False)
    assert engine.build_status is None
    assert engine.startup_report()["build"] == "none (no build_dir, no build cache)"
    assert not cache_root.exists()


def test_a_build_dir_takes_precedence_over_the_cache(tmp_path: Path, cache_root: Path) -> None:
    from compiled_serve.build.compile import compile_build

    compile_build(_config(tmp_path), tmp_path / "builds", show_progress=False)
    engine = start_engine(_config(tmp_path, build_dir=str(tmp_path / "builds")), spinner=False)
    assert engine.build_status is not None and engine.build_status.loaded and engine.build_status.cache is None
    assert not cache_root.exists()


_START = """
import logging, sys
from compiled_serve.logging_setup import configure_logging
from compiled_serve.config import EngineConfig
from compiled_serve.startup import start_engine
configure_logging("info")
engine = start_engine(EngineConfig(model={model!r}, load_format="dummy", dtype="float32", compile_mode={mode!r},
                                   num_kv_blocks=64, max_num_seqs=8, device="cpu"), spinner=False)
from torch._dynamo.utils import counters
print("STATUS", engine.build_status.loaded, flush=True)
print("SUMMARY", engine.startup_report()["build"], flush=True)
print("COUNTERS", dict(counters["inductor"]), flush=True)
print("TRACED", engine.compile_report.num_graphs + engine.tail_report.num_graphs, flush=True)
print("PRECOMPILED", engine.precompiled.num_loaded, engine.precompiled.num_compiled, flush=True)
"""


def _start_in_subprocess(tmp_path: Path, cache_root: Path, mode: str = "graph",
                         inductor_dir: Path | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COMPILED_SERVE_CACHE_ROOT": str(cache_root)}
    if inductor_dir is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_dir)
    code = _START.format(model=tiny_config_path(tmp_path), mode=mode)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return out, err


def test_progress_lines_appear_once_each(tmp_path: Path, cache_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A cold then a warm start: each phase's log record exactly once (that each record is printed
    once, timestamped, is tests/cli/test_logging_setup.py's part)."""
    import logging

    caplog.set_level(logging.INFO, logger="compiled_serve")
    start_engine(_config(tmp_path), spinner=False)
    cold = [r.getMessage() for r in caplog.records]
    caplog.clear()
    engine = start_engine(_config(tmp_path), spinner=False)
    warm = [r.getMessage() for r in caplog.records]
    cold_phases = ("loading weights:", "loaded weights in", "build cache: no build", "compiling (warm-up steps)",
                   "passes on graph 0:", "compiled graph 0 (graph) in", "passes on logits-tail graph 0:",
                   "warm-up done in", "stored in the build cache", "engine ready in")
    for phase in cold_phases:
        assert sum(phase in line for line in cold) == 1, (phase, cold)
    for phase in ("loaded from the build cache", "warm-up done in", "engine ready in"):
        assert sum(phase in line for line in warm) == 1, (phase, warm)
    assert not any("stored in the build cache" in line or "build cache: no build" in line for line in warm)
    ready = next(line for line in warm if "engine ready in" in line)
    assert "build: cache hit: build" in ready
    # The ready line's figures are the startup summary's.
    logged = re.search(r"compile and warm-up ([\d.]+)s", ready)
    reported = re.search(r"in ([\d.]+)s$", engine.startup_report()["compile_status"])
    assert logged and reported and logged.group(1) == reported.group(1)
    assert engine.build_status is not None and ready.endswith(engine.build_status.message)


@pytest.mark.heavy
def test_concurrent_starts_share_one_sound_build(tmp_path: Path, cache_root: Path) -> None:
    procs = [_start_in_subprocess(tmp_path, cache_root) for _ in range(2)]
    for p in procs:
        _finish(p)
    cache = BuildCache(cache_root)
    (entry,) = cache.entries()
    assert not cache.store.verify(entry.path)
    assert not [n for n in os.listdir(cache.store.root) if n.startswith(".tmp-")]
    out, _ = _finish(_start_in_subprocess(tmp_path, cache_root))
    assert "STATUS True" in out


@pytest.mark.heavy
def test_inductor_warm_start_compiles_nothing(tmp_path: Path, cache_root: Path) -> None:
    """Each process gets an empty Inductor cache dir, so what the second one runs can only come
    from the build cache: it loads the cold start's AOT-compiled functions (build/precompiled.py),
    traces nothing, and Inductor generates no code and looks nothing up."""
    out1, _ = _finish(_start_in_subprocess(tmp_path, cache_root, "inductor", tmp_path / "inductor-1"))
    out2, _ = _finish(_start_in_subprocess(tmp_path, cache_root, "inductor", tmp_path / "inductor-2"))

    def line(out: str, tag: str) -> str:
        return next(x for x in out.splitlines() if x.startswith(tag + " ")).removeprefix(tag + " ")

    cold, warm = (json.loads(line(out, "COUNTERS").replace("'", '"')) for out in (out1, out2))
    assert "STATUS False" in out1 and int(line(out1, "TRACED")) >= 2
    loaded, compiled = map(int, line(out1, "PRECOMPILED").split())
    assert loaded == 0 and compiled >= 2
    assert "STATUS True" in out2 and line(out2, "TRACED") == "0"
    assert line(out2, "PRECOMPILED") == f"{compiled} 0"
    assert warm.get("fxgraph_cache_miss", 0) == 0 and warm.get("fxgraph_cache_hit", 0) == 0, warm
    # The startup summary reports the same counters.
    assert f"Inductor: {warm.get('fxgraph_cache_hit', 0)} graph(s) from cache, 0 generated" in out2
    # The cold start's AOT compile generated the model graph's code without the FX cache.
    assert cold.get("fxgraph_cache_hit", 0) == 0 and "Inductor: 0 graph(s) from cache, 1 generated" in out1


def _tiny_gguf(tmp_path: Path) -> str:
    import gguf
    from tiny_models import tiny_hf_model, write_tiny_gguf

    path = str(tmp_path / "tiny.gguf")
    Q = gguf.GGMLQuantizationType
    write_tiny_gguf(path, tiny_hf_model("llama"), "llama", {"ffn_gate": Q.Q4_1, "attn_v.": Q.Q8_0})
    return path


def test_a_gguf_model_comes_back_from_the_cache_equal_to_the_file(tmp_path: Path, cache_root: Path) -> None:
    from compiled_serve.build.model_snapshot import load_model_cached, snapshot_key
    from compiled_serve.models.loader import load_model

    path = _tiny_gguf(tmp_path)
    config = EngineConfig(model=path, dtype="float32", device="cpu")
    cache = BuildCache()
    key = snapshot_key(config, torch.float32, torch.device("cpu"))
    assert key is not None and cache.load(key) is None
    first = load_model_cached(config, torch.float32, torch.device("cpu"), cache)
    assert cache.load(key) is not None  # stored
    second = load_model_cached(config, torch.float32, torch.device("cpu"), cache)
    reference = load_model(path, dtype=torch.float32, device="cpu")
    assert second.config == reference.config and second.weight_fingerprint == reference.weight_fingerprint
    assert second.source == first.source
    ours, theirs = second.module.state_dict(), reference.module.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(second.module.model.rotary_emb.inv_freq, reference.module.model.rotary_emb.inv_freq)
    assert not second.module.training and not any(p.requires_grad for p in second.module.parameters())
    assert all(isinstance(p, torch.nn.Parameter) for p in second.module.parameters())

    os.utime(path, ns=(0, 0))  # the file changed (its mtime): another key, a miss
    assert snapshot_key(config, torch.float32, torch.device("cpu")) != key
    assert snapshot_key(EngineConfig(model=path, dtype="bfloat16"), torch.bfloat16, torch.device("cpu")) != key


@pytest.mark.heavy
def test_the_embedded_models_tokenizer_survives_the_cache(tmp_path: Path, cache_root: Path) -> None:
    from compiled_serve.build.model_snapshot import load_model_cached

    config = EngineConfig(device="cpu")
    cache = BuildCache()
    first = load_model_cached(config, torch.float32, torch.device("cpu"), cache)
    second = load_model_cached(config, torch.float32, torch.device("cpu"), cache)
    assert second.source == first.source and "from the build cache" not in second.source
    text = "Hello, world! <|im_start|>user\nÇa va? 日本語 1234<|im_end|>"
    assert second.tokenizer(text).input_ids == first.tokenizer(text).input_ids
    assert second.tokenizer.decode(first.tokenizer(text).input_ids) == first.tokenizer.decode(
        first.tokenizer(text).input_ids)
    assert second.chat_template == first.chat_template == second.tokenizer.chat_template
    assert (second.tokenizer.eos_token, second.tokenizer.bos_token) == (first.tokenizer.eos_token,
                                                                        first.tokenizer.bos_token)
    ours, theirs = second.module.state_dict(), first.module.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
