"""The base class every graph pass derives from.

A pass rewrites a torch.fx GraphModule in place and returns how many sites it matched. Its
`uuid()` hashes its own source, so a change to a pass invalidates every build that used it. Its
`phase` says where the PassManager runs it: clean-ups first, pattern rewrites next, fix-ups last.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging

import torch
import torch.fx

logger = logging.getLogger("compiled_serve.passes")

#: The order the PassManager runs phases in; within a phase, passes keep their declared order.
PHASES: tuple[str, ...] = ("cleanup", "rewrite", "fixup")


class GraphPass:
    """Subclass, set `name` (and `phase`), implement `apply(graph_module) -> matches`."""

    name: str = "graph-pass"
    #: Modules the pass relies on beyond its own and its bases' (hashed into `uuid()`).
    uuid_modules: tuple[str, ...] = ()
    #: "cleanup" | "rewrite" | "fixup" (see PHASES).
    phase: str = "rewrite"
    #: A pass that must match at least once, or compilation fails (never serve unrewritten).
    required: bool = False
    #: Device types the default pipeline runs the pass on; () = opt-in only (by name). The
    #: kernel-fusion passes are opt-in: measured, Inductor's own fusion of the same ops is as fast
    #: on CUDA and faster on the CPU (docs/perf-notes.md).
    devices: tuple[str, ...] = ("cpu", "cuda")

    def apply(self, gm: torch.fx.GraphModule) -> int:
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule) -> int:
        from compiled_serve.errors import CompilationError

        matches = self.apply(gm)
        logger.info("%s: %d match(es)", self.name, matches)
        if self.required and matches == 0:
            raise CompilationError(
                f"{self.name} found nothing to rewrite; refusing to serve the unrewritten graph"
            )
        gm.graph.lint()
        gm.recompile()
        return matches

    @classmethod
    def uuid(cls) -> str:
        """sha256 of the source files of this class and its bases, and of `uuid_modules`.

        Whole modules, not just class bodies: a pass's matcher functions live beside it.
        """
        digest = hashlib.sha256()
        seen: set[str] = set()
        sources = [klass for klass in cls.__mro__ if klass is not object]
        for item in [*sources, *(importlib.import_module(m) for m in cls.uuid_modules)]:
            module = inspect.getmodule(item)
            key = getattr(module, "__name__", "") if module is not None else ""
            if key in seen and key != "__main__":
                continue
            seen.add(key)
            digest.update(_source(module if module is not None and key != "__main__" else item).encode())
        return digest.hexdigest()


def _source(obj: object) -> str:
    try:
        return inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):  # defined where no source file exists (a REPL, exec)
        return getattr(obj, "__qualname__", repr(obj))


def count_ops(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Op name -> count; what `--explain` and op-count tests read.

    call_function targets by `op_name`; tensor methods (dynamo keeps `x.pow(2)` as a method call)
    as "Tensor.pow".
    """
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            key = op_name(node.target)
        elif node.op == "call_method":
            key = f"Tensor.{node.target}"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return counts


def op_name(target: object) -> str:
    """"namespace::op" for torch ops (packet or overload alike), else the callable's name."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    return getattr(target, "__name__", str(target))
