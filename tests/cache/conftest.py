"""Shared fixtures for the artifact-store tests: a valid key that each test varies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from compiled_serve.cache.build_key import BuildKey


def make_key(**overrides: Any) -> BuildKey:
    """A fixed, fully specified key (no toolchain probing, so digests are stable in tests)."""
    fields: dict[str, Any] = dict(
        model_config={"hidden_size": 64, "num_layers": 2, "rope_theta": 10000.0, "tie": True},
        weight_fingerprint="sha256:" + "ab" * 32,
        passes=(("paged_attention", "uuid-1"), ("fuse_rmsnorm", "uuid-2")),
        buckets=(1, 2, 4, 8),
        dtype="bfloat16",
        device_capability="cuda:9.0",
        torch_version="2.11.0+cu130",
        triton_version="3.6.0",
        compile_mode="default",
    )
    fields.update(overrides)
    return BuildKey(**fields)


@pytest.fixture(name="make_key")
def make_key_fixture() -> Callable[..., BuildKey]:
    return make_key


@pytest.fixture
def key() -> BuildKey:
    return make_key()


@pytest.fixture
def artifacts() -> dict[str, bytes]:
    return {"model.bin": b"\x00compiled" * 100, "graph.json": b'{"nodes": 3}', "empty.bin": b""}
