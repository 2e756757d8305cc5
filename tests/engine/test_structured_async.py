"""Grammar-constrained rows on the asynchronous step path, with the real SmolLM2 weights.

The masks of step N+1 need step N's tokens. The async path enqueues step N+1's forward first,
then finishes step N (its tokens accepted by the matchers) and fills the masks while the device
runs that forward; unconstrained rows in the batch do not make anything wait. These tests check:
the same tokens as the synchronous and the legacy paths (greedy and seeded sampling, constrained
rows beside unconstrained ones, beside a penalised row that takes the host-built tail, and a
grammar that finishes early), and the order itself: with a step in flight, the next step's
logits exist before the step in flight is processed (the old path drained it first).
"""

from __future__ import annotations

import pytest
from structured_cases import CHOICES, REGEX, SCHEMAS, assert_valid_json

from compiled_serve.llm import LLM
from compiled_serve.sampling_params import SamplingParams
from compiled_serve.structured import StructuredOutputsParams

PROMPTS = ["Answer with the requested data.\n", "Give me a JSON record.\n", "Reply briefly.\n",
           "Describe a person.\n", "Pick one.\n", "Write something.\n"]


def _requests(with_penalty: bool) -> list[tuple[str, SamplingParams]]:
    schema = StructuredOutputsParams(json=SCHEMAS["nested_object"])
    reqs = [
        (PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=schema)),
        (PROMPTS[1], SamplingParams(temperature=1.0, seed=7, max_tokens=60, structured_outputs=StructuredOutputsParams(
            json=SCHEMAS["bounded_array"]))),
        (PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)),  # unconstrained
        (PROMPTS[3], SamplingParams(temperature=1.0, seed=3, max_tokens=40, structured_outputs=StructuredOutputsParams(
            regex=REGEX))),
        (PROMPTS[4], SamplingParams(temperature=0.0, max_tokens=20, structured_outputs=StructuredOutputsParams(
            choice=CHOICES))),  # finishes after a few tokens, while the others go on
        (PROMPTS[5], SamplingParams(temperature=0.8, seed=11, max_tokens=30, ignore_eos=True)),
    ]
    if with_penalty:
        reqs.append((PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                repetition_penalty=1.3)))
    return reqs


@pytest.fixture(scope="module")
def engines() -> dict[str, LLM]:
    return {mode: LLM(compile_mode="graph", scheduling=mode, max_num_seqs=16, cpu_kv_cache_gib=0.25)
            for mode in ("async", "sync", "legacy")}


def _generate(llm: LLM, with_penalty: bool) -> list[tuple[list[int], str, str]]:
    reqs = _requests(with_penalty)
    outputs = llm.generate([p for p, _ in reqs], [s for _, s in reqs])
    return [(list(o.outputs[0].token_ids), o.outputs[0].text, o.outputs[0].finish_reason) for o in outputs]


@pytest.mark.parametrize("with_penalty", [False, True], ids=["masks-late", "beside-host-tail"])
def test_async_gives_the_sync_and_legacy_tokens(engines, with_penalty: bool) -> None:
    results = {mode: _generate(llm, with_penalty) for mode, llm in engines.items()}
    assert results["async"] == results["sync"]
    assert results["async"] == results["legacy"]
    texts = [text for _, text, _ in results["async"]]
    assert_valid_json(texts[0], SCHEMAS["nested_object"])
    assert_valid_json(texts[1], SCHEMAS["bounded_array"])
    assert texts[4] in CHOICES
    assert results["async"][4][2] == "stop" and len(results["async"][4][0]) < 20


def test_masks_are_filled_after_the_next_forward_is_enqueued(engines) -> None:
    """With constrained rows and a step in flight, step N+1's logits are computed before step N
    is processed (step N's tokens accepted, N+1's masks filled): the old path processed step N
    first, so the device sat idle while the host filled the masks."""
    engine = engines["async"].llm_engine
    events: list[str] = []
    process = engine._process

    def recording_process(step):
        events.append("process")
        return process(step)

    engine._process = recording_process
    engine.step_runner.on_logits = lambda seqs, logits: events.append("logits")
    try:
        reqs = _requests(with_penalty=False)
        for i, (prompt, params) in enumerate(reqs):
            engine.add_request(f"order-{i}", prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
        engine._finish_inflight()
    finally:
        engine._process = process
        engine.step_runner.on_logits = None
    # Every step samples (one prefill step, then decodes), so the i-th "logits" is step i's
    # forward and the i-th "process" finishes step i. Step i's forward comes before step i-1 is
    # processed; the old path (drain, then launch) had it the other way round.
    logits = [k for k, e in enumerate(events) if e == "logits"]
    processed = [k for k, e in enumerate(events) if e == "process"]
    assert len(logits) == len(processed) > 10
    assert all(logits[i] < processed[i - 1] for i in range(1, len(logits))), events
