"""PassManager: runs a pass list over one captured graph, phase by phase, and says what it did.

Order is explicit: every "cleanup" pass, then every "rewrite" pass, then every "fixup" pass;
within a phase, passes keep the order they were given in. Each call returns a `PassReport` with
op counts before and after every pass, its match count and its time; `explain(report)` renders
it for `compiled-serve compile --explain`. With `dump_dir`, the graph's readable source before
and after each pass lands there as text (`graph0-01-rotary-after.py`), for debugging a pattern.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch.fx

from compiled_serve.errors import CompilationError
from compiled_serve.passes.base import PHASES, GraphPass, count_ops

logger = logging.getLogger("compiled_serve.passes")


@dataclass(frozen=True)
class PassRecord:
    """What one pass did to one graph."""

    name: str
    phase: str
    matches: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    seconds: float

    def changed_ops(self) -> dict[str, tuple[int, int]]:
        """op -> (before, after), only the ops whose count moved."""
        names = sorted(set(self.ops_before) | set(self.ops_after))
        pairs = {n: (self.ops_before.get(n, 0), self.ops_after.get(n, 0)) for n in names}
        return {n: (b, a) for n, (b, a) in pairs.items() if b != a}


@dataclass
class PassReport:
    """Every pass's record for one graph, in the order they ran."""

    records: list[PassRecord] = field(default_factory=list)

    @property
    def matches(self) -> dict[str, int]:
        return {r.name: r.matches for r in self.records}

    @property
    def ops_before(self) -> dict[str, int]:
        return dict(self.records[0].ops_before) if self.records else {}

    @property
    def ops_after(self) -> dict[str, int]:
        return dict(self.records[-1].ops_after) if self.records else {}

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)


class PassManager:
    """`PassManager(passes)(gm) -> PassReport`; `uuids()` names the pass list in the build key."""

    def __init__(self, passes: Iterable[GraphPass], dump_dir: str | Path | None = None, label: str = "graph"):
        # `label` names this manager's graphs in the log ("passes on logits-tail graph 0"), so the
        # model's graph 0 and the logits tail's graph 0 are told apart.
        self.label = label
        passes = list(passes)
        for p in passes:
            if not isinstance(p, GraphPass):
                raise CompilationError(f"{p!r} is not a GraphPass instance")
        names = [p.name for p in passes]
        for p in passes:
            if p.phase not in PHASES:
                raise CompilationError(f"pass {p.name!r} has phase {p.phase!r}; use one of {', '.join(PHASES)}")
            if names.count(p.name) > 1:
                raise CompilationError(f"two passes are named {p.name!r}; pass names must be unique")
        # sorted() is stable: declared order survives within a phase.
        self.passes: list[GraphPass] = sorted(passes, key=lambda p: PHASES.index(p.phase))
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self._graphs_seen = 0

    def __call__(self, gm: torch.fx.GraphModule) -> PassReport:
        report = PassReport()
        graph_id = self._graphs_seen
        self._graphs_seen += 1
        for i, p in enumerate(self.passes):
            before = count_ops(gm)
            self._dump(gm, graph_id, i, p, "before")
            start = time.perf_counter()
            matches = p(gm)
            seconds = time.perf_counter() - start
            self._dump(gm, graph_id, i, p, "after")
            report.records.append(PassRecord(p.name, p.phase, matches, before, count_ops(gm), seconds))
        logger.info("passes on %s %d: %s in %.3fs", self.label, graph_id, report.matches, report.seconds)
        return report

    def uuids(self) -> list[tuple[str, str]]:
        """(name, source hash) of every pass in run order: what the artifact key covers."""
        return [(p.name, p.uuid()) for p in self.passes]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def _dump(self, gm: torch.fx.GraphModule, graph_id: int, index: int, p: GraphPass, when: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        path = self.dump_dir / f"graph{graph_id}-{index:02d}-{p.name}-{when}.py"
        path.write_text(gm.print_readable(print_output=False))


def explain(report: PassReport) -> str:
    """Plain-text account: per pass, its matches and every op count it changed (before -> after)."""
    lines = [f"{'pass':<24} {'phase':<8} {'matches':>7} {'ms':>8}  op counts (before -> after)"]
    for r in report.records:
        changed = r.changed_ops()
        head = f"{r.name:<24} {r.phase:<8} {r.matches:>7} {r.seconds * 1e3:>8.1f}  "
        if not changed:
            lines.append(head + "(no change)")
            continue
        for j, (op, (b, a)) in enumerate(changed.items()):
            lines.append((head if j == 0 else " " * len(head)) + f"{op}: {b} -> {a}")
    total_before, total_after = sum(report.ops_before.values()), sum(report.ops_after.values())
    lines.append(f"total ops: {total_before} -> {total_after}; {report.seconds * 1e3:.1f} ms in passes")
    return "\n".join(lines)
