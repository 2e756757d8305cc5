"""The pass-author example of docs/passes.md: it is the code in doc_example_pass.py, and it works."""

from __future__ import annotations

from pathlib import Path

import torch
from doc_example_pass import DoubleToAddPass
from pass_testing import capture, graph_inputs, op_count

from compiled_serve.passes.registry import default_pass_manager

ROOT = Path(__file__).resolve().parents[2]


def test_the_doc_shows_the_example_verbatim() -> None:
    source = (ROOT / "tests/passes/doc_example_pass.py").read_text()
    example = source.split("# --- begin doc example ---\n")[1].split("# --- end doc example ---")[0]
    assert example.strip() in (ROOT / "docs/passes.md").read_text()
    assert example.strip() in (ROOT / "README.md").read_text()


class Doubler(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = input_ids.float()  # [T]
        return x * 2 + positions * 3


def test_example_counts_and_parity() -> None:
    gm, example = capture("doubler", Doubler())
    reference, _ = capture("doubler", Doubler())
    assert op_count(gm, "mul") == 2
    assert DoubleToAddPass()(gm) == 1
    assert op_count(gm, "mul") == 1 and op_count(gm, "add") == 2
    ids, pos = torch.arange(5), torch.arange(5) + 2
    torch.testing.assert_close(gm(*graph_inputs(gm, example, ids, pos)),
                               reference(*graph_inputs(reference, example, ids, pos)))


def test_example_plugs_in_by_dotted_path() -> None:
    manager = default_pass_manager(extra=["doc_example_pass:DoubleToAddPass"])
    assert manager.names[-2:] == ["double-to-add", "paged-attention"]  # rewrite phase, before fixups


def test_engine_config_plugs_in_a_user_pass(monkeypatch) -> None:
    """EngineConfig.extra_passes reaches the engine's pass manager and its build key."""
    from compiled_serve.config import EngineConfig
    from compiled_serve.engine.llm_engine import LLMEngine

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    engine = LLMEngine(EngineConfig(model="smollm2-135m", load_format="dummy", compile_mode="graph",
                                    num_kv_blocks=64, extra_passes=("doc_example_pass:DoubleToAddPass",)))
    names = [name for name, _ in engine.build_key.passes]
    assert "double-to-add" in names and "paged-attention" in names
    assert "double-to-add" in engine.pass_manager.names
