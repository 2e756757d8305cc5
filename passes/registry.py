"""Where passes come from: the built-in list, a user's dotted path, installed entry points.

A user's pass plugs in without editing this package, two ways:
  - by spec in config: `"mypkg.mymod:MyPass"` (a GraphPass subclass, instantiated with no
    arguments, or a GraphPass instance), or a built-in's name (`"rotary"`);
  - by entry point: a distribution declaring, in its pyproject.toml,
        [project.entry-points."compiled_serve.passes"]
        my-pass = "mypkg.mymod:MyPass"
    is loaded by every `default_pass_manager()`.
Anything that does not resolve to a GraphPass raises CompilationError saying which spec and why.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterable
from pathlib import Path

from compiled_serve.errors import CompilationError
from compiled_serve.passes.base import GraphPass
from compiled_serve.passes.fused_add_rms_norm import FusedAddRMSNormPass
from compiled_serve.passes.manager import PassManager
from compiled_serve.passes.noop_elimination import NoOpEliminationPass
from compiled_serve.passes.paged_attention import PagedAttentionPass
from compiled_serve.passes.rotary import RotaryPass
from compiled_serve.passes.silu_mul import SiluMulPass

ENTRY_POINT_GROUP = "compiled_serve.passes"

#: Built-in passes by name, in default order (the manager then sorts by phase).
BUILTIN_PASSES: dict[str, type[GraphPass]] = {
    cls.name: cls
    for cls in (NoOpEliminationPass, FusedAddRMSNormPass, SiluMulPass, RotaryPass, PagedAttentionPass)
}

PassSpec = str | GraphPass | type[GraphPass]


def resolve_pass(spec: PassSpec) -> GraphPass:
    """A GraphPass from an instance, a subclass, a built-in name or "module.path:Attribute"."""
    if isinstance(spec, GraphPass):
        return spec
    if isinstance(spec, type) and issubclass(spec, GraphPass):
        return _instantiate(spec, repr(spec))
    if not isinstance(spec, str):
        raise CompilationError(f"pass spec {spec!r} is not a string, GraphPass class or instance")
    if spec in BUILTIN_PASSES:
        return BUILTIN_PASSES[spec]()
    if ":" not in spec:
        raise CompilationError(
            f"pass spec {spec!r} is neither a built-in pass ({', '.join(BUILTIN_PASSES)}) "
            "nor a dotted path like 'mypkg.mymod:MyPass'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a user's module may fail in any way while importing
        raise CompilationError(f"pass spec {spec!r}: cannot import {module_name!r}: {e}") from e
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CompilationError(f"pass spec {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return _as_pass(obj, f"pass spec {spec!r}")


def entry_point_passes() -> list[GraphPass]:
    """Every pass installed under the `compiled_serve.passes` entry-point group, sorted by name."""
    passes = []
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        where = f"entry point {ep.name!r} ({ep.value}) in group {ENTRY_POINT_GROUP!r}"
        try:
            obj = ep.load()
        except Exception as e:  # a broken plug-in must say which one it is
            raise CompilationError(f"{where} failed to load: {e}") from e
        passes.append(_as_pass(obj, where))
    return passes


def default_pass_manager(
    extra: Iterable[PassSpec] = (),
    disabled: Iterable[str] = (),
    dump_dir: str | Path | None = None,
    device: str | None = None,
) -> PassManager:
    """Built-ins, then installed entry points, then `extra`; minus the names in `disabled`.

    With `device` ("cpu" / "cuda"), built-in passes that do not pay off there are left out.

    Disabling a required pass (paged-attention) or a name no pass has is a CompilationError:
    a typo must not silently keep a pass on, and attention must always become paged.
    """
    passes = [cls() for cls in BUILTIN_PASSES.values() if device is None or device in cls.devices]
    passes += entry_point_passes()
    passes += [resolve_pass(spec) for spec in extra]
    off = set(disabled)
    unknown = off - {p.name for p in passes} - set(BUILTIN_PASSES)
    if unknown:
        raise CompilationError(
            f"cannot disable unknown pass(es) {sorted(unknown)}; known: {[p.name for p in passes]}")
    for p in passes:
        if p.name in off and p.required:
            raise CompilationError(f"pass {p.name!r} is required and cannot be disabled")
    return PassManager([p for p in passes if p.name not in off], dump_dir=dump_dir)


def _as_pass(obj: object, where: str) -> GraphPass:
    if isinstance(obj, GraphPass):
        return obj
    if isinstance(obj, type) and issubclass(obj, GraphPass):
        return _instantiate(obj, where)
    raise CompilationError(f"{where} is {obj!r}, not a GraphPass subclass or instance")


def _instantiate(cls: type[GraphPass], where: str) -> GraphPass:
    try:
        return cls()
    except Exception as e:  # a user's constructor
        raise CompilationError(f"{where}: {cls.__name__}() failed: {e}") from e
