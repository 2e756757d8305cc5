"""On the CPU the compiled step runs without dynamo's guard check once the warm-up has compiled it
(model_runner.GuardsOffAfterWarmup): the engine arms it before ready, and a workload of every
step shape serving makes (chunked prefills of several lengths, mixed steps, decodes of a
changing batch, a lone decode) gives the same tokens armed as unarmed, and compiles nothing.
Armed in process, the step calls its one compiled graph directly (passes/direct_call.py): the
same workload gives the same tokens that way too."""

from __future__ import annotations

from pathlib import Path

from tiny_engine import tiny_engine

from compiled_serve.engine.model_runner import GuardsOffAfterWarmup
from compiled_serve.sampling_params import SamplingParams

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], list(range(1, 40)), [7], list(range(50, 71))]


def _workload(engine, tag: str) -> list[list[int]]:
    for i, prompt in enumerate(PROMPTS):  # different lengths and budgets: requests finish apart
        params = SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True)
        engine.add_request(f"{tag}{i}", prompt, params, output_kind="final")
    done = {}
    while engine.has_unfinished_requests():
        done |= {o.request_id: list(o.outputs[0].token_ids) for o in engine.step() if o.finished}
    return [done[f"{tag}{i}"] for i in range(len(PROMPTS))]


def test_the_armed_step_gives_the_guarded_steps_tokens_and_compiles_nothing(tmp_path: Path) -> None:
    engine = tiny_engine(tmp_path, max_num_batched_tokens=16)  # prompts of 21 and 39 are chunked
    step = engine.runner.step_fn
    assert isinstance(step, GuardsOffAfterWarmup) and step.armed  # armed by the engine before ready
    assert step.direct is not None and step.direct is engine.compile_report.direct_call()
    assert engine.step_runner.step_fn is step
    graphs = engine.compile_report.num_graphs
    direct = _workload(engine, "d")
    step.direct = None
    armed = _workload(engine, "a")
    step.armed = False
    guarded = _workload(engine, "g")
    assert direct == armed == guarded
    assert engine.compile_report.num_graphs == graphs  # neither run traced a new graph
