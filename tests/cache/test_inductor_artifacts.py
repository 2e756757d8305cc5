"""torch's compile-cache artifacts survive a trip through the store and give a cache hit.

The round trip mimics a server starting on a fresh machine: dynamo's in-memory state is
reset and ``TORCHINDUCTOR_CACHE_DIR`` points at an empty directory, so the only way the
second compile can hit is through the artifacts loaded from the store. A control compile
in another empty directory (before installing) shows that it would otherwise miss.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from compiled_serve.cache.artifact_store import ArtifactStore
from compiled_serve.cache.build_key import BuildKey
from compiled_serve.cache.errors import InductorArtifactError
from compiled_serve.cache.inductor_artifacts import (
    INDUCTOR_CACHE_ARTIFACT,
    INDUCTOR_CACHE_INDEX,
    capture_inductor_artifacts,
    install_inductor_artifacts,
    recording_compile_artifacts,
)


def _tiny(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * 2.0 + torch.cos(x) * x


def _compile_and_run(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Compile `_tiny` from scratch (no in-memory state): (out, cache hits, cache misses).

    Hits and misses add Inductor's FX graph cache and AOTAutograd's cache: a true warm
    start hits both.
    """
    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(_tiny, backend="inductor", dynamic=False)(x)
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    misses = counters["inductor"]["fxgraph_cache_miss"] + counters["aot_autograd"]["autograd_cache_miss"]
    return out, hits, misses


@pytest.fixture
def inductor_caches_on() -> Iterator[None]:
    """The local caches must be on for torch to record artifacts; other tests may turn them off."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    # Config modules' own patch(): monkeypatch's undo leaves an entry torch then reports missing.
    with inductor_config.patch(force_disable_caches=False, fx_graph_cache=True), \
            functorch_config.patch(enable_autograd_cache=True):
        yield
    torch._dynamo.reset()


@pytest.mark.heavy
@pytest.mark.usefixtures("inductor_caches_on")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_round_trip_through_store_is_a_cache_hit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: BuildKey, device: str
) -> None:
    x = torch.linspace(-2.0, 2.0, 16, device=device)
    expected = _tiny(x)

    # Build: compile into an empty cache dir, capture what torch recorded, persist it.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-build"))
    with recording_compile_artifacts():
        built, hits, misses = _compile_and_run(x)
        artifacts = capture_inductor_artifacts()
    assert (hits, misses) == (0, 2)
    torch.testing.assert_close(built, expected)
    assert set(artifacts) == {INDUCTOR_CACHE_ARTIFACT, INDUCTOR_CACHE_INDEX}
    store = ArtifactStore(tmp_path / "store")
    store.save(key, artifacts, report={"what": "tiny inductor build"})

    # Control: a fresh cache dir with nothing installed misses.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-control"))
    with recording_compile_artifacts():
        _, hits, misses = _compile_and_run(x)
    assert (hits, misses) == (0, 2)

    # Serve: another fresh cache dir, artifacts loaded (verified) from the store, installed.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-serve"))
    loaded = store.load(key)
    assert loaded is not None
    installed = install_inductor_artifacts(loaded.artifacts[INDUCTOR_CACHE_ARTIFACT])
    assert installed.get("inductor"), installed
    with recording_compile_artifacts():
        served, hits, misses = _compile_and_run(x)
    assert (hits, misses) == (2, 0)
    torch.testing.assert_close(served, expected)


def test_capture_with_nothing_compiled_is_empty() -> None:
    with recording_compile_artifacts():
        assert capture_inductor_artifacts() == {}


def test_install_refuses_unreadable_blob() -> None:
    with pytest.raises(InductorArtifactError, match="could not read"):
        install_inductor_artifacts(b"\x00" * 3 + b"not a cache blob")
    with pytest.raises(TypeError):
        install_inductor_artifacts("text")  # type: ignore[arg-type]
