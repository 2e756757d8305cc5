"""The asynchronous step path against the synchronous one and the legacy per-step path.

The same requests (greedy, seeded sampling with n > 1, penalties, logprobs, min_tokens, a stop
token finishing early, chunked prefill) through all three `scheduling` modes give the same
tokens; logprobs agree to rounding. Async overlaps steps, so it also runs a step for sequences
that turn out to be finished: those tokens must never reach the output.
"""

from __future__ import annotations

import pytest
from tiny_engine import tiny_engine

from compiled_serve.sampling_params import SamplingParams

REQUESTS = [
    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.9, seed=3, max_tokens=15, ignore_eos=True, n=2),
    SamplingParams(temperature=0.7, seed=5, max_tokens=12, repetition_penalty=1.3, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=9, logprobs=3, ignore_eos=True),
    SamplingParams(temperature=0.8, seed=9, max_tokens=30, min_tokens=4, stop_token_ids=[7, 11, 13, 17]),
    SamplingParams(temperature=1.0, seed=2, top_k=8, top_p=0.9, max_tokens=25, ignore_eos=True,
                   frequency_penalty=0.5),
]


def _run(tmp_path, scheduling: str) -> dict[str, list]:
    engine = tiny_engine(tmp_path, scheduling=scheduling, max_num_batched_tokens=64)
    for i, p in enumerate(REQUESTS):
        engine.add_request(str(i), list(range(1, 40 + 7 * i)), p)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert engine._inflight is None or not engine.has_unfinished_requests()
    return done


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("legacy"), "legacy")


@pytest.mark.parametrize("scheduling", ["sync", "async"])
def test_same_tokens_as_the_legacy_path(tmp_path, legacy, scheduling):
    got = _run(tmp_path, scheduling)
    assert sorted(got) == sorted(legacy)
    for rid, ref in legacy.items():
        for a, b in zip(got[rid].outputs, ref.outputs, strict=True):
            assert a.token_ids == b.token_ids, rid
            assert a.finish_reason == b.finish_reason and a.stop_reason == b.stop_reason
            if b.logprobs is not None:
                for la, lb in zip(a.logprobs, b.logprobs, strict=True):
                    assert la.keys() == lb.keys()
                    assert all(abs(la[t].logprob - lb[t].logprob) < 1e-5 for t in lb)
    # The stop-token request really stopped early, so async ran (and dropped) a step past it.
    assert legacy["4"].outputs[0].finish_reason == "stop"
    assert len(legacy["4"].outputs[0].token_ids) < 30


def test_async_step_overlaps_and_returns_the_previous_steps_tokens(tmp_path):
    engine = tiny_engine(tmp_path, scheduling="async")
    engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert engine.step() == []  # the prefill is launched; its token is not read yet
    assert engine._inflight is not None
    seq = engine._requests["a"].seqs[0]
    assert seq.num_pending == 1 and seq.output_token_ids == []
    engine.step()  # launches step 2 (its input id filled on the device), then reads step 1
    assert len(seq.output_token_ids) == 1 and seq.num_pending == 1
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 4
    assert seq.num_pending == 0


def test_delta_outputs_concatenate_to_the_cumulative_ones(tmp_path):
    """output_kind="delta" hands out each token (and logprob entry) exactly once, in order."""
    engine = tiny_engine(tmp_path)
    params = SamplingParams(temperature=0.8, seed=4, max_tokens=11, ignore_eos=True, n=2, logprobs=2)
    engine.add_request("d", list(range(1, 30)), params, output_kind="delta", detokenize=False)
    engine.add_request("c", list(range(1, 30)), params)
    got: dict[int, list] = {0: [], 1: []}
    lps: dict[int, list] = {0: [], 1: []}
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "d":
                for c in out.outputs:
                    got[c.index] += c.token_ids
                    lps[c.index] += c.logprobs
                    assert c.text == ""  # not detokenized by the engine
            elif out.finished:
                final = out
    for c in final.outputs:
        assert got[c.index] == c.token_ids
        assert [sorted(d) for d in lps[c.index]] == [sorted(d) for d in c.logprobs]


def test_unknown_output_kind_is_refused(tmp_path):
    from compiled_serve.errors import InvalidParameterError

    engine = tiny_engine(tmp_path)
    with pytest.raises(InvalidParameterError, match="output_kind"):
        engine.add_request("x", [1, 2], SamplingParams(max_tokens=2), output_kind="all")


@pytest.mark.heavy
def test_inductor_step_gives_the_graph_mode_tokens(tmp_path):
    """The default compile mode on the CPU: Inductor, with the per-layer caches as graph inputs."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    tokens = {}
    for mode in ("graph", "inductor"):
        engine = tiny_engine(tmp_path, compile_mode=mode, max_num_batched_tokens=64)
        engine.add_request("a", list(range(1, 50)), params)
        engine.add_request("b", list(range(3, 20)), params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens[(mode, out.request_id)] = out.outputs[0].token_ids
    assert tokens[("graph", "a")] == tokens[("inductor", "a")]
    assert tokens[("graph", "b")] == tokens[("inductor", "b")]
