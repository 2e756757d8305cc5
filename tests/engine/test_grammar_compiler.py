"""The grammar compiler on the SmolLM2 tokenizer: specs compile, the hostile specs of vLLM's
advisories (GHSA-6qc9-v4r8-22xg, 9hcf-v7m4-6m2j, hf3c-wxg2-49q9) are a 400 naming the field
within a bounded time, the cache stays within its bounds, and a matcher's masks agree with
what the grammar's reference (re.fullmatch) accepts."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from compiled_serve.errors import InvalidParameterError
from compiled_serve.kernels.token_bitmask import bitmask_width
from compiled_serve.sampling_params import SamplingParams
from compiled_serve.structured import GrammarCache, GrammarCompiler, StructuredOutputsParams, shared_compiler
from compiled_serve.structured.backend import CompiledGrammar

VOCAB = 49152


def deep_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    return schema


HOSTILE = {
    "nested_200": (StructuredOutputsParams(json=deep_schema(200)), "too deeply"),
    "enum_100k": (StructuredOutputsParams(json={"enum": [f"value-{i}" for i in range(100_000)]}), "too large"),
    "catastrophic_regex": (StructuredOutputsParams(regex="(a{1000}){1000}"), "repeats too much"),
    "pattern_in_schema": (StructuredOutputsParams(json={"type": "string", "pattern": "((ab){500}){500}"}),
                          "repeats too much"),
    "no_start_rule": (StructuredOutputsParams(grammar='item: "a" | "b"'), "start"),
    "malformed_schema": (StructuredOutputsParams(json={"type": "object", "required": "a"}), "not a valid JSON schema"),
    "bad_regex": (StructuredOutputsParams(regex="(unclosed"), "regex"),
    "bad_lark": (StructuredOutputsParams(grammar="start: ("), "constraint"),
}


@pytest.fixture(scope="module")
def compiler(smollm2_tokenizer) -> GrammarCompiler:
    return shared_compiler(smollm2_tokenizer, VOCAB)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_and_invalid_specs_are_a_bounded_400_naming_the_field(compiler, name: str) -> None:
    spec, words = HOSTILE[name]
    started = time.monotonic()
    with pytest.raises(InvalidParameterError) as caught:
        compiler.compile(spec)
    assert time.monotonic() - started < compiler.timeout_s + 1
    assert caught.value.field == spec.field and words in caught.value.message, caught.value.message
    with pytest.raises(InvalidParameterError) as renamed:
        compiler.compile(spec, field="guided_x")
    assert renamed.value.field == "guided_x"


def test_specs_must_name_exactly_one_constraint() -> None:
    for kwargs in ({}, {"regex": "a", "choice": ["a"]}, {"choice": []}, {"json": "[1"}, {"json": [1]},
                   {"json_object": False}, {"grammar": "  "}):
        with pytest.raises(InvalidParameterError) as caught:
            StructuredOutputsParams(**kwargs)
        assert caught.value.field.startswith("structured_outputs")


def test_sampling_params_carry_the_spec_as_plain_data() -> None:
    params = SamplingParams(structured_outputs={"regex": "[0-9]+"})  # as msgpack delivers it
    assert params.structured_outputs == StructuredOutputsParams(regex="[0-9]+")
    with pytest.raises(InvalidParameterError):
        SamplingParams(structured_outputs={"regexp": "a"})


def _mask_allows(grammar: CompiledGrammar, text_so_far: list[int]) -> np.ndarray:
    matcher = grammar.matcher()
    for token in text_so_far:
        assert matcher.accept_token(token)
    row = np.empty(bitmask_width(VOCAB), dtype=np.int32)
    matcher.fill_bitmask(row)
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:VOCAB]
    return np.flatnonzero(bits)


def test_mask_allows_exactly_the_tokens_that_keep_a_regex_match_possible(compiler, smollm2_tokenizer) -> None:
    """Reference: a token is allowed iff prefix + its text is a prefix of some match of [0-9]{2,3}x."""
    grammar = compiler.compile(StructuredOutputsParams(regex="[0-9]{2,3}x"))
    prefix = smollm2_tokenizer.encode("4")
    allowed = set(_mask_allows(grammar, prefix).tolist())
    could = re.compile(r"[0-9]{0,2}x?")  # after "4": at most two more digits, then x, and nothing after it
    for token in range(VOCAB):
        text = smollm2_tokenizer.decode([token])
        if token == smollm2_tokenizer.eos_token_id or not text or "\ufffd" in text:
            continue
        ok = bool(could.fullmatch(text)) and not (text.endswith("x") and len(text) < 2)
        assert (token in allowed) == ok, (token, text)


def test_cache_is_bounded_in_entries_and_bytes(compiler) -> None:
    cache = GrammarCache(max_entries=3, max_bytes=500_000)
    small = GrammarCompiler(compiler.backend, cache)
    for i in range(6):
        small.compile(StructuredOutputsParams(regex=f"[a-z]{{{i + 1}}}"))
        assert len(cache) <= 3 and cache.nbytes <= 500_000
    assert len(cache) == 3
    big_choices = [f"choice number {i} " * 20 for i in range(200)]  # ~200 kB charged each: two fit
    for n in range(3):
        small.compile(StructuredOutputsParams(choice=big_choices[n:]))
        assert cache.nbytes <= 500_000
    assert len(cache) == 2
    hits, misses = cache.hits, cache.misses
    small.compile(StructuredOutputsParams(choice=big_choices[2:]))  # the newest: still there
    small.compile(StructuredOutputsParams(choice=big_choices[0:]))  # the oldest: evicted
    assert (cache.hits, cache.misses) == (hits + 1, misses + 1)


def test_a_steps_rows_are_each_sequences_own_fill(compiler, smollm2_tokenizer) -> None:
    """`StructuredState.bitmask_rows` for a mixed batch at different grammar states: each row equals
    that sequence's own one-row fill (`bitmask_row`), unconstrained rows stay all ones, and a
    matcher that failed gets the EOS-only row."""
    from compiled_serve.engine.sequence import Sequence
    from compiled_serve.engine.structured_state import StructuredState

    eos = smollm2_tokenizer.eos_token_id
    state = StructuredState(smollm2_tokenizer, VOCAB, {eos})
    specs = [StructuredOutputsParams(regex="[0-9]{2,5}x"), StructuredOutputsParams(choice=["alpha", "beta gamma"]),
             StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}},
                                           "required": ["a"]}), None]
    seqs = []
    for i in range(16):
        seq = Sequence(f"r{i}", 0, [1, 2, 3], SamplingParams(max_tokens=8), 8)
        spec = specs[i % len(specs)]
        state.attach(seq, None if spec is None else compiler.compile(spec))
        for step in range(i // len(specs)):  # rows at different states: take the k-th allowed token
            row = state.bitmask_row(seq)
            if row is None:
                break
            allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:VOCAB])
            state.accept(seq, int(allowed[(7 * i + step) % len(allowed)]))
        seqs.append(seq)
    broken = seqs[0]
    state.accept(broken, smollm2_tokenizer.encode("z")[0])  # the regex cannot take it: the matcher ends
    state.attach(broken, compiler.compile(specs[0]))
    state._matchers[broken]._matcher.consume_token(smollm2_tokenizer.encode("z")[0])  # now in error, still attached
    assert state._matchers[broken].error is not None

    batch = state.bitmask_rows(seqs)
    for j, seq in enumerate(seqs):
        own = state.bitmask_row(seq)
        want = np.full(bitmask_width(VOCAB), -1, dtype=np.int32) if own is None else own
        np.testing.assert_array_equal(batch[j], want, err_msg=f"row {j}")
    eos_only = np.zeros(bitmask_width(VOCAB), dtype=np.int32)
    eos_only[eos // 32] = np.int32(np.uint32(1 << (eos % 32)).view(np.int32))
    np.testing.assert_array_equal(batch[0], eos_only)
    assert (batch[3] == -1).all() and (batch[1] != -1).any()  # unconstrained / constrained
