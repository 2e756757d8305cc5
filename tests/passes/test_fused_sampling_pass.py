"""FusedSamplingPass on the captured logits tail: one fused_sample, parity with the unrewritten graph.

The reference is the dynamo graph of `logits_tail` left as captured (pure torch: the sampler's
penalties and sort-based filter, the Philox noise op); the rewritten graph must give the same
tokens and logprobs on every kind of row, and the same as the reference's pieces.
"""

from __future__ import annotations

import random
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx

from compiled_serve.errors import CompilationError
from compiled_serve.kernels.logits_tail import apply_penalties, logits_tail
from compiled_serve.passes.base import count_ops
from compiled_serve.passes.fused_sampling import FusedSamplingPass
from compiled_serve.passes.logits_tail_pipeline import (
    EnginePasses,
    compile_logits_tail,
    logits_tail_pass_manager,
)
from compiled_serve.passes.manager import PassManager
from compiled_serve.passes.registry import default_pass_manager

PENALTY_GROUPS = ["none", "repetition", "frequency", "both"]
UNFUSED_OPS = ("compiled_serve::sampling_filter", "compiled_serve::philox_exponential", "Tensor.softmax",
               "Tensor.argmax", "Tensor.log_softmax", "Tensor.gather", "where")  # fmt: skip


def tail_inputs(num_rows: int, vocab: int, groups: str, seed: int) -> tuple[torch.Tensor | None, ...]:
    """Mixed rows: greedy, temperature 0, sampled with and without each filter, seeded alike."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    logits = torch.randn(num_rows, vocab, generator=gen) * 3.0
    temperature = torch.where(rand(num_rows) < 0.15, 0.0, 0.3 + 1.5 * rand(num_rows))
    top_k = torch.where(rand(num_rows) < 0.5, 0, torch.randint(1, vocab, (num_rows,), generator=gen)).int()
    top_p = torch.where(rand(num_rows) < 0.5, 1.0, 0.3 + 0.65 * rand(num_rows))
    min_p = torch.where(rand(num_rows) < 0.6, 0.0, 0.2 * rand(num_rows))
    seeds = torch.randint(-(2**62), 2**62, (num_rows,), generator=gen)
    seeds[: num_rows // 2] = 1234  # rows with one seed still draw apart at other offsets
    offsets = torch.randint(0, 50, (num_rows,), generator=gen)
    greedy = rand(num_rows) < 0.2
    repetition = seen = frequency = presence = counts = None
    if groups in ("repetition", "both"):
        repetition, seen = 0.5 + 1.5 * rand(num_rows), rand(num_rows, vocab) < 0.3
    if groups in ("frequency", "both"):
        frequency, presence = 2 * rand(num_rows) - 1, 2 * rand(num_rows) - 1
        counts = torch.randint(0, 4, (num_rows, vocab), generator=gen).float() * (rand(num_rows, vocab) < 0.2)
    return (logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy,
            repetition, seen, frequency, presence, counts)  # fmt: skip


def fresh(fn: Callable) -> Callable:
    """`fn` with a code object of its own, so each capture gets its own dynamo cache."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def compiled(fn: Callable, rewrite: Callable[[torch.fx.GraphModule], Any] | None) -> tuple[Callable, list]:
    """fn under dynamo (dynamic, fullgraph); each graph goes through `rewrite` first (None: as captured)."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        if rewrite is not None:
            rewrite(gm)
        graphs.append(gm)
        return gm.forward

    return torch.compile(fresh(fn), backend=backend, dynamic=True, fullgraph=True), graphs


def captured(groups: str, fn: Callable = logits_tail) -> torch.fx.GraphModule:
    run, graphs = compiled(fn, None)
    run(*tail_inputs(6, 40, groups, seed=0))
    assert len(graphs) == 1
    return graphs[0]


@pytest.mark.parametrize("groups", PENALTY_GROUPS)
def test_tail_becomes_one_fused_sample(groups: str) -> None:
    gm = captured(groups)
    before = count_ops(gm)
    assert before["compiled_serve::sampling_filter"] == before["compiled_serve::philox_exponential"] == 1
    assert before["Tensor.argmax"] == 2 and before["Tensor.softmax"] == before["Tensor.log_softmax"] == 1
    assert before["where"] == {"none": 2, "repetition": 4, "frequency": 2, "both": 4}[groups]
    assert FusedSamplingPass()(gm) == 1
    after = count_ops(gm)
    assert after.get("compiled_serve::fused_sample") == 1
    assert all(after.get(op, 0) == 0 for op in UNFUSED_OPS), after
    assert set(after) <= {"compiled_serve::fused_sample", "getitem", "Tensor.float"}, after
    fused = next(n for n in gm.graph.nodes if n.op == "call_function" and "fused_sample" in str(n.target))
    given = [a is not None for a in fused.args[8:13]]
    assert fused.args[13] is None  # no bitmask: tests/passes/test_fused_sampling_bitmask.py
    assert given == {"none": [False] * 5, "repetition": [True, True, False, False, False],
                     "frequency": [False, False, True, True, True], "both": [True] * 5}[groups]  # fmt: skip


@pytest.mark.parametrize("groups", PENALTY_GROUPS)
def test_rewritten_tail_matches_the_unrewritten_graph(groups: str) -> None:
    reference, _ = compiled(logits_tail, None)
    rewritten, graphs = compiled(logits_tail, logits_tail_pass_manager())
    rng = random.Random(groups)
    for trial in range(6):
        num_rows = 1 if trial == 0 else rng.randint(2, 24)
        inputs = tail_inputs(num_rows, rng.randint(2, 300), groups, seed=trial)
        want_ids, want_logprobs = reference(*inputs)
        got_ids, got_logprobs = rewritten(*inputs)
        assert torch.equal(got_ids, want_ids), (trial, num_rows)
        torch.testing.assert_close(got_logprobs, want_logprobs, rtol=0, atol=1e-6)
    assert len(graphs) == 2  # dynamo's 0/1 specialisation: N=1, then every other N
    assert all(count_ops(gm).get("compiled_serve::fused_sample") == 1 for gm in graphs)


def test_rewritten_tail_agrees_with_the_reference_penalties() -> None:
    """Greedy rows take the argmax after the reference's apply_penalties; logprobs are raw."""
    inputs = tail_inputs(16, 64, "both", seed=5)
    logits, temperature, *_, greedy, repetition, seen, frequency, presence, counts = inputs
    tail, _ = compile_logits_tail("graph")
    token_ids, logprobs = tail(*inputs)
    penalised = apply_penalties(logits, repetition, seen, frequency, presence, counts)
    is_greedy = greedy | (temperature <= 0)
    assert is_greedy.any() and not is_greedy.all()
    assert torch.equal(token_ids[is_greedy], penalised.argmax(-1)[is_greedy])
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).gather(1, token_ids[:, None])[:, 0])


def tail_without_temperature(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy, *penalties):  # type: ignore[no-untyped-def]
    """The tail with the temperature divide left out: a different sampler, not to be fused."""
    raw = logits.float()
    greedy = greedy | (temperature <= 0)
    probs = torch.ops.compiled_serve.sampling_filter(raw, top_k, top_p, min_p).softmax(dim=-1)
    noise = torch.ops.compiled_serve.philox_exponential(seeds, offsets, greedy, logits.shape[-1])
    token_ids = torch.where(greedy, raw.argmax(dim=-1), (probs / noise).argmax(dim=-1))
    return token_ids, raw.log_softmax(dim=-1).gather(1, token_ids[:, None])[:, 0]


def tail_greedy_on_raw_logits(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy,  # type: ignore[no-untyped-def]
                              repetition_penalty, seen_mask, frequency_penalty, presence_penalty, output_counts):
    """Greedy rows ignore the penalties the sampled rows see: not what fused_sample computes."""
    raw = logits.float()
    penalised = raw - frequency_penalty[:, None] * output_counts
    penalised = penalised - presence_penalty[:, None] * (output_counts > 0).float()
    greedy = greedy | (temperature <= 0)
    scaled = penalised / torch.where(greedy, 1.0, temperature)[:, None]
    probs = torch.ops.compiled_serve.sampling_filter(scaled, top_k, top_p, min_p).softmax(dim=-1)
    noise = torch.ops.compiled_serve.philox_exponential(seeds, offsets, greedy, logits.shape[-1])
    token_ids = torch.where(greedy, raw.argmax(dim=-1), (probs / noise).argmax(dim=-1))
    return token_ids, raw.log_softmax(dim=-1).gather(1, token_ids[:, None])[:, 0]


def tail_with_noise_on_greedy_rows_only(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy,  # type: ignore[no-untyped-def]
                                        *penalties):
    """The noise skips the sampled rows instead of the greedy ones: they would all draw argmax."""
    raw = logits.float()
    greedy = greedy | (temperature <= 0)
    scaled = raw / torch.where(greedy, 1.0, temperature)[:, None]
    probs = torch.ops.compiled_serve.sampling_filter(scaled, top_k, top_p, min_p).softmax(dim=-1)
    noise = torch.ops.compiled_serve.philox_exponential(seeds, offsets, ~greedy, logits.shape[-1])
    token_ids = torch.where(greedy, raw.argmax(dim=-1), (probs / noise).argmax(dim=-1))
    return token_ids, raw.log_softmax(dim=-1).gather(1, token_ids[:, None])[:, 0]


@pytest.mark.parametrize("fn", [tail_without_temperature, tail_greedy_on_raw_logits,
                                tail_with_noise_on_greedy_rows_only])
def test_a_different_tail_is_not_fused_and_the_required_pass_fails(fn: Callable) -> None:
    gm = captured("both", fn)
    before = count_ops(gm)
    with pytest.raises(CompilationError, match="fused-sampling found nothing to rewrite"):
        FusedSamplingPass()(gm)
    assert count_ops(gm) == before  # untouched


def tail_with_penalties_swapped(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy,  # type: ignore[no-untyped-def]
                                repetition_penalty, seen_mask, frequency_penalty, presence_penalty, output_counts):
    """Frequency/presence before repetition: not the op's order."""
    raw = logits.float()
    penalised = raw - frequency_penalty[:, None] * output_counts
    penalised = penalised - presence_penalty[:, None] * (output_counts > 0).float()
    penalty = repetition_penalty[:, None]
    penalised = torch.where(seen_mask, torch.where(penalised > 0, penalised / penalty, penalised * penalty),
                            penalised)  # fmt: skip
    greedy = greedy | (temperature <= 0)
    scaled = penalised / torch.where(greedy, 1.0, temperature)[:, None]
    probs = torch.ops.compiled_serve.sampling_filter(scaled, top_k, top_p, min_p).softmax(dim=-1)
    noise = torch.ops.compiled_serve.philox_exponential(seeds, offsets, greedy, logits.shape[-1])
    token_ids = torch.where(greedy, penalised.argmax(dim=-1), (probs / noise).argmax(dim=-1))
    return token_ids, raw.log_softmax(dim=-1).gather(1, token_ids[:, None])[:, 0]


def test_penalties_in_another_order_fuse_from_the_frequency_penalised_logits() -> None:
    """The op takes the frequency-penalised logits as its input and applies only the repetition
    penalty; the frequency ops and the raw logprob gather stay, and the result is unchanged."""
    reference, _ = compiled(tail_with_penalties_swapped, None)
    rewritten, graphs = compiled(tail_with_penalties_swapped, FusedSamplingPass())
    inputs = tail_inputs(9, 70, "both", seed=3)
    want, got = reference(*inputs), rewritten(*inputs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ops = count_ops(graphs[0])
    assert ops["compiled_serve::fused_sample"] == 1 and ops["sub"] == 2 and ops["Tensor.log_softmax"] == 1
    fused = next(n for n in graphs[0].graph.nodes if "fused_sample" in str(n.target))
    assert [a is not None for a in fused.args[8:]] == [True, True, False, False, False, False]


def test_tail_pipeline_and_build_key() -> None:
    manager = logits_tail_pass_manager()
    assert manager.names == ["noop-elimination", "fused-sampling"]
    assert all(p.required == (p.name == "fused-sampling") for p in manager.passes)
    model = default_pass_manager(device="cpu")
    uuids = dict(EnginePasses(model, manager).uuids())
    assert uuids["logits-tail/fused-sampling"] == FusedSamplingPass.uuid()
    assert uuids["paged-attention"] and uuids["inductor-options"]  # the backend's Inductor options count too
    assert len(uuids) == len(model.passes) + 1 + 2
    with pytest.raises(CompilationError, match="fused-sampling"):  # the model pipeline is not the tail's
        PassManager([FusedSamplingPass()])(captured("none", tail_without_temperature))


@pytest.mark.heavy
def test_inductor_compiled_tail_matches_the_reference() -> None:
    tail, report = compile_logits_tail("inductor")
    for num_rows, groups in ((5, "both"), (1, "none")):
        inputs = tail_inputs(num_rows, 100, groups, seed=num_rows)
        want_ids, want_logprobs = logits_tail(*inputs)
        got_ids, got_logprobs = tail(*inputs)
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_logprobs, want_logprobs)
    assert [g["matches"]["fused-sampling"] for g in report.graphs] == [1, 1]
