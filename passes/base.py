"""The base class every graph pass derives from.

A pass rewrites a torch.fx GraphModule in place and returns how many sites it matched. Its
`uuid()` hashes its own source, so a change to a pass invalidates every build that used it. Its
`phase` says where the PassManager runs it: clean-ups first, pattern rewrites next, fix-ups last.
"""

from __future__ import annotations

import hashlib
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
    #: "cleanup" | "rewrite" | "fixup" (see PHASES).
    phase: str = "rewrite"
    #: A pass that must match at least once, or compilation fails (never serve unrewritten).
    required: bool = False

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
        """sha256 of the source of this class and its bases up to GraphPass."""
        digest = hashlib.sha256()
        for klass in cls.__mro__:
            if klass is object:
                break
            digest.update(inspect.getsource(klass).encode())
        return digest.hexdigest()


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
