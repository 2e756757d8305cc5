"""A warm start runs the build's AOT-compiled step and logits tail (compiled_serve.build.precompiled).

The cold start AOT-compiles each variant its full warm-up reaches and stores them in the build; the
warm start loads them, so dynamo traces nothing (the backend, where the passes run, is never
called), the warm-up shrinks to one short request, and the tokens are the cold start's. A build
made for another KV-cache geometry, or a variant that does not load, is traced again before ready.
Fast: the tiny dummy Llama in "graph" mode, on the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from compiled_serve.build.precompiled import INDEX_ARTIFACT, Precompiled, PrecompiledFunction
from compiled_serve.cache.build_cache import BuildCache
from compiled_serve.config import EngineConfig
from compiled_serve.sampling_params import SamplingParams
from compiled_serve.startup import start_engine

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "models"))
from tiny_engine import tiny_config_path  # noqa: E402


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


_PARAMS = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
           SamplingParams(temperature=0.8, top_k=5, seed=7, max_tokens=6, ignore_eos=True),
           SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=6, ignore_eos=True, logprobs=2)]


def _generate(engine: Any) -> list[list[int]]:
    """Three requests side by side: greedy, seeded top-k, and a penalised one with logprobs (the
    host-built tail variant)."""
    for i, params in enumerate(_PARAMS):
        engine.add_request(f"r{i}", [1, 2, 3, 4 + i], params, output_kind="final")
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    return [done[f"r{i}"] for i in range(len(_PARAMS))]



def test_warm_start_traces_nothing_and_generates_the_same(tmp_path: Path, cache_root: Path) -> None:
    cold = start_engine(_config(tmp_path), spinner=False)
    assert cold.precompiled is not None and not cold.precompiled.complete
    compiled = cold.precompiled.num_compiled
    assert compiled >= 3  # the step and at least two tail variants, from the full warm-up
    assert cold.compile_report.num_graphs == 1 and cold.tail_report.num_graphs >= 2
    entry = BuildCache(cache_root).store.load(cold.build_key)
    assert entry is not None and INDEX_ARTIFACT in entry.artifacts
    assert sum(name.startswith("precompiled-") for name in entry.artifacts) == compiled

    warm = start_engine(_config(tmp_path), spinner=False)
    assert warm.build_status is not None and warm.build_status.loaded
    pre = warm.precompiled
    assert pre is not None and pre.complete and pre.num_loaded == compiled and pre.num_compiled == 0
    # No dynamo trace reached the backend (where the passes and the compile run), for either function.
    assert warm.compile_report.num_graphs == 0 and warm.tail_report.num_graphs == 0
    assert warm.startup_report()["compile_status"].startswith(f"loaded {compiled} precompiled function(s)")
    assert _generate(warm) == _generate(cold)
    # Serving reached only stored variants: nothing was traced after ready.
    assert all(fn.num_fallback_calls == 0 for fn in pre.functions.values())
    assert warm.compile_report.num_graphs == 0 and warm.tail_report.num_graphs == 0


def test_another_kv_geometry_traces_again_before_ready(tmp_path: Path, cache_root: Path) -> None:
    """num_kv_blocks is not in the build key; the precompiled functions' context says what they
    were compiled against, and a start with another KV cache traces (and warms up fully) instead."""
    cold = start_engine(_config(tmp_path), spinner=False)
    other = start_engine(_config(tmp_path, num_kv_blocks=48), spinner=False)
    assert other.build_status is not None and other.build_status.loaded
    assert other.precompiled is None  # nothing usable loaded, and a loaded build is not stored again
    assert other.compile_report.num_graphs == 1  # traced again, during its warm-up
    assert _generate(other) == _generate(cold)


class _FakeCompiled:
    """Stands in for a torch.compile'd function: counts plain calls and AOT compiles."""

    def __init__(self) -> None:
        self.calls = 0
        self.aot = 0

    def __call__(self, *args: Any) -> str:
        self.calls += 1
        return "dynamo"

    def aot_compile(self, example: Any) -> Any:
        self.aot += 1

        class _Fn:
            def guard_check(self, *args: Any) -> bool:
                return args[0] != "bad"

            def fn(self, *args: Any) -> str:
                return "aot"

        return _Fn()


def test_variants_dispatch_on_none_arguments_and_unknown_ones_go_to_dynamo() -> None:
    compiled = _FakeCompiled()
    fn = PrecompiledFunction("tail", compiled, {}, recording=True)
    assert fn(1, None) == "aot" and fn(2, None) == "aot" and compiled.aot == 1  # one variant per None pattern
    assert fn(1, 2) == "aot" and compiled.aot == 2
    # A call its variant's guards refuse goes to dynamo, and the variant is not stored.
    assert fn("bad", None) == "dynamo" and fn.num_fallback_calls == 1
    assert (False, True) not in fn.variants and (False, True) in fn.rejected
    assert fn(3, None) == "dynamo" and compiled.aot == 2  # a refused pattern stays with dynamo
    # Not recording (a warm start): an unknown pattern is traced by dynamo, never AOT-compiled.
    warm = PrecompiledFunction("tail", compiled, {}, recording=False)
    assert warm(None, None) == "dynamo" and compiled.aot == 2 and warm.num_fallback_calls == 1


def test_an_unloadable_variant_is_traced_again() -> None:
    index = b'{"context":"kv x","format":1,"functions":{"tail":[{"artifact":"precompiled-tail-0.bin","none":[false,true]}]}}'
    pre = Precompiled.from_build({INDEX_ARTIFACT: index, "precompiled-tail-0.bin": b"not a pickle"}, "kv x")
    fn = pre.wrap("tail", _FakeCompiled(), {})
    assert pre.num_loaded == 0 and not pre.complete
    assert fn(1, None) == "dynamo"
    # Another context: nothing is loaded, and the start records afresh.
    assert Precompiled.from_build({INDEX_ARTIFACT: index}, "kv y").recording
