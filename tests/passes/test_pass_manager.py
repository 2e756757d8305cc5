"""PassManager: phase order, reports, dumps, uuids, explain; and the whole default list on a tiny
Llama, checked against eager dense attention through the paged cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pass_testing import LAYERS, capture, fresh_cache_metadata, graph_inputs, tiny_model

from compiled_serve.errors import CompilationError
from compiled_serve.kernels.forward_context import forward_context
from compiled_serve.passes.base import GraphPass
from compiled_serve.passes.manager import PassManager, explain
from compiled_serve.passes.registry import default_pass_manager


class Recorder(GraphPass):
    def __init__(self, name: str, phase: str, log: list[str]):
        self.name, self.phase, self.log = name, phase, log

    def apply(self, gm: torch.fx.GraphModule) -> int:
        self.log.append(self.name)
        return 1


def test_phases_run_in_order_and_stable_within_a_phase(tmp_path: Path) -> None:
    log: list[str] = []
    passes = [Recorder("fix", "fixup", log), Recorder("r1", "rewrite", log), Recorder("clean", "cleanup", log),
              Recorder("r2", "rewrite", log)]
    manager = PassManager(passes, dump_dir=tmp_path)
    gm, _ = capture("llama")
    report = manager(gm)
    assert log == ["clean", "r1", "r2", "fix"] == manager.names
    assert report.matches == {"clean": 1, "r1": 1, "r2": 1, "fix": 1}
    assert [r.ops_before == r.ops_after for r in report.records] == [True] * 4
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps[:2] == ["graph0-00-clean-after.py", "graph0-00-clean-before.py"] and len(dumps) == 8
    assert "def forward" in (tmp_path / "graph0-03-fix-after.py").read_text()


def test_bad_pass_lists_are_refused() -> None:
    with pytest.raises(CompilationError, match="phase 'late'"):
        PassManager([Recorder("x", "late", [])])
    with pytest.raises(CompilationError, match="two passes are named 'x'"):
        PassManager([Recorder("x", "rewrite", []), Recorder("x", "fixup", [])])
    with pytest.raises(CompilationError, match="not a GraphPass"):
        PassManager([object()])  # type: ignore[list-item]


def test_default_list_order_and_uuids() -> None:
    manager = default_pass_manager()
    assert manager.names == ["noop-elimination", "fused-add-rms-norm", "silu-mul", "rotary", "paged-attention"]
    uuids = manager.uuids()
    assert [n for n, _ in uuids] == manager.names and all(len(h) == 64 for _, h in uuids)
    assert len({h for _, h in uuids}) == len(uuids)
    assert default_pass_manager(disabled=["rotary"]).names == [n for n in manager.names if n != "rotary"]


def test_default_passes_on_llama_match_eager_through_the_paged_cache() -> None:
    gm, example = capture("llama")
    report = default_pass_manager()(gm)
    assert report.matches == {"noop-elimination": 2 * (2 * LAYERS + 1) + 2, "fused-add-rms-norm": 2 * LAYERS + 1,
                              "silu-mul": LAYERS, "rotary": LAYERS, "paged-attention": LAYERS}
    after = report.ops_after
    assert after["compiled_serve::paged_attention"] == LAYERS and "compiled_serve::causal_attention" not in after
    assert after["compiled_serve::fused_add_rms_norm"] == 2 * LAYERS
    assert not {"rsqrt", "silu", "neg", "cat"} & set(after)
    text = explain(report)
    assert "compiled_serve::fused_add_rms_norm: 0 -> 4" in text and "total ops:" in text
    lens = [5, 3]
    ids = [torch.randint(0, 256, (n,)) for n in lens]
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad(), forward_context(fresh_cache_metadata(lens)):
        (paged,) = gm(*graph_inputs(gm, example, torch.cat(ids), positions))
    with torch.no_grad():
        eager = torch.cat([tiny_model("llama")(i, torch.arange(len(i))) for i in ids])
    torch.testing.assert_close(paged, eager, rtol=1e-5, atol=1e-5)


def test_bf16_casts_do_not_hide_the_patterns() -> None:
    """In bf16 the norm's casts are real (nothing to clean up); every pattern still matches."""
    gm, example = capture("qwen3", dtype=torch.bfloat16)
    reference, _ = capture("qwen3", dtype=torch.bfloat16)
    report = PassManager([p for p in default_pass_manager().passes if p.name != "paged-attention"])(gm)
    assert report.matches == {"noop-elimination": 0, "fused-add-rms-norm": 2 * LAYERS + 1 + 2 * LAYERS,
                              "silu-mul": LAYERS, "rotary": LAYERS}
    ids, positions = torch.randint(0, 256, (6,)), torch.randint(0, 60, (6,))
    with torch.no_grad():
        (got,) = gm(*graph_inputs(gm, example, ids, positions))
        (want,) = reference(*graph_inputs(reference, example, ids, positions))
    # The fused ops round once (fp32 inside); the unfused graph rounds after every bf16 op.
    torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)
