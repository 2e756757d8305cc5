"""Start-up freezes what lives for the whole process out of the garbage collector's view
(compiled_serve/long_lived_objects.py) in the processes the package owns (the engine core's,
`serve`'s), and garbage made afterwards is still collected; `start_engine`, which the offline
`LLM()` runs in a user's process, freezes nothing."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from tiny_engine import tiny_config_path

from compiled_serve.config import EngineConfig
from compiled_serve.long_lived_objects import freeze_long_lived_objects
from compiled_serve.startup import start_engine


@pytest.fixture(autouse=True)
def _unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the test session collects as before


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_freezing_keeps_live_objects_and_still_collects_later_cycles() -> None:
    kept = [_Node() for _ in range(1000)]
    freeze_long_lived_objects()
    assert gc.get_freeze_count() >= len(kept)
    assert not any(gc.is_tracked(k) and k in gc.get_objects() for k in kept[:3])  # no generation holds them
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # a cycle made after the freeze
    del a, b
    assert gc.collect() >= 2


def test_start_engine_leaves_a_users_process_unfrozen(tmp_path: Path) -> None:
    engine = start_engine(EngineConfig(model=tiny_config_path(tmp_path), load_format="dummy", dtype="float32",
                                       compile_mode="graph", num_kv_blocks=16, max_num_seqs=2, device="cpu",
                                       build_cache=False), spinner=False)
    assert gc.get_freeze_count() == 0
    assert any(obj is engine for obj in gc.get_objects())  # collectable once the user drops it
