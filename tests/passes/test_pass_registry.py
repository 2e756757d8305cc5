"""Where passes come from: built-in names, dotted paths, entry points; bad specs fail clearly."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from compiled_serve.errors import CompilationError
from compiled_serve.passes.registry import ENTRY_POINT_GROUP, default_pass_manager, resolve_pass
from compiled_serve.passes.rotary import RotaryPass


def test_specs_resolve() -> None:
    assert isinstance(resolve_pass("rotary"), RotaryPass)
    assert isinstance(resolve_pass(RotaryPass), RotaryPass)
    p = RotaryPass()
    assert resolve_pass(p) is p
    assert resolve_pass("compiled_serve.passes.rotary:RotaryPass").name == "rotary"


@pytest.mark.parametrize(("spec", "message"), [
    ("nope", "neither a built-in pass"),
    ("no_such_module_xyz:Pass", "cannot import 'no_such_module_xyz'"),
    ("compiled_serve.passes.rotary:Missing", "has no attribute 'Missing'"),
    ("compiled_serve.passes.rotary:match_rotation", "not a GraphPass"),
    (42, "is not a string"),
])
def test_bad_specs_say_what_is_wrong(spec: object, message: str) -> None:
    with pytest.raises(CompilationError, match=message):
        resolve_pass(spec)  # type: ignore[arg-type]


def test_disabling_unknown_or_required_passes_is_refused() -> None:
    with pytest.raises(CompilationError, match="unknown pass"):
        default_pass_manager(disabled=["rotray"])
    with pytest.raises(CompilationError, match="required"):
        default_pass_manager(disabled=["paged-attention"])


def _install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """A distribution on sys.path declaring `target` in our entry-point group, as pip would leave it."""
    (tmp_path / "my_passes.py").write_text(
        "from compiled_serve.passes.base import GraphPass\n\n"
        "class CountNodes(GraphPass):\n"
        "    name = 'count-nodes'\n"
        "    phase = 'cleanup'\n\n"
        "    def apply(self, gm):\n"
        "        return len(gm.graph.nodes)\n")
    info = tmp_path / "my_passes-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-passes\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ncount-nodes = {target}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()


def test_entry_point_passes_load_automatically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_plugin(tmp_path, monkeypatch, "my_passes:CountNodes")
    manager = default_pass_manager()
    assert manager.names[:2] == ["noop-elimination", "count-nodes"]  # cleanups, built-ins first
    sys.modules.pop("my_passes", None)


def test_a_broken_entry_point_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_plugin(tmp_path, monkeypatch, "my_passes:Gone")
    with pytest.raises(CompilationError, match="entry point 'count-nodes'.*failed to load"):
        default_pass_manager()
    sys.modules.pop("my_passes", None)


def test_kernel_fusions_are_opt_in_on_every_device() -> None:
    from compiled_serve.passes.registry import default_pass_manager as build

    fusions = {"fused-add-rms-norm", "silu-mul", "rotary"}
    for device in ("cpu", "cuda"):
        names = build(device=device).names
        assert "paged-attention" in names and "noop-elimination" in names
        assert not fusions & set(names)
        # `--pass NAME` turns one on, and it runs in its phase's place (before the required fix-up).
        chosen = build(device=device, extra=["rotary"]).names
        assert "rotary" in chosen and chosen.index("rotary") < chosen.index("paged-attention")
    cpu = build(device="cpu").names
    # Naming a pass that the device filter already dropped is not an error.
    assert build(device="cpu", disabled=["rotary"]).names == cpu
