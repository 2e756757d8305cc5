"""xgrammar, the optional second grammar backend, behind the same interface as llguidance, on the
SmolLM2 tokenizer and (offline, temperature 1.0) the real SmolLM2 weights: the schema cases of
tests/structured_cases.py validate with jsonschema, regex/choice/Lark outputs match their
references, masks agree with llguidance's where both are canonical, hostile specs are a bounded
400 naming the field, and what xgrammar would accept without enforcing is a 400 too.
Skipped as a whole when xgrammar is not installed (it is an optional extra)."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

xgr = pytest.importorskip("xgrammar")

from structured_cases import CHOICES, LARK, LARK_OUTPUT, REGEX, SCHEMAS, assert_valid_json  # noqa: E402

from compiled_serve.cli import build_parser  # noqa: E402
from compiled_serve.config import EngineConfig  # noqa: E402
from compiled_serve.errors import InvalidParameterError  # noqa: E402
from compiled_serve.kernels.token_bitmask import bitmask_width  # noqa: E402
from compiled_serve.sampling_params import SamplingParams  # noqa: E402
from compiled_serve.structured import GrammarCompiler, StructuredOutputsParams  # noqa: E402
from compiled_serve.structured.compiler import resolve_backend, shared_compiler  # noqa: E402
from compiled_serve.structured.xgrammar_backend import XGrammarBackend, unenforced_keyword  # noqa: E402

VOCAB = 49152
WORDS = bitmask_width(VOCAB)
PROMPT = "Answer with the requested data.\n"
UNENFORCED = {"bounded_numbers"}  # `score`: multipleOf 0.25 on a number, which xgrammar ignores
VALID = {  # one text per spec that obeys it
    "nested_object": '{"name":"Ann","address":{"city":"Paris","zip":"75001"}}',
    "bounded_array": '{"tags":["a","bc"]}',
    "enum": '{"color":"red","size":"M"}',
    "any_of": '{"id":"id-abc"}',
    "string_pattern": '{"email":"ab@cd.com","phone":"123-4567"}',
}


@pytest.fixture(scope="module")
def backend(smollm2_tokenizer) -> XGrammarBackend:
    return XGrammarBackend(smollm2_tokenizer, VOCAB)


@pytest.fixture(scope="module")
def compiler(backend) -> GrammarCompiler:
    return GrammarCompiler(backend)


def allowed(matcher) -> set[int]:
    row = np.empty(WORDS, dtype=np.int32)
    matcher.fill_bitmask(row)
    return set(np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")).tolist())


def test_backend_names_follow_vllm() -> None:
    assert resolve_backend("auto") == resolve_backend("guidance") == resolve_backend(None) == "llguidance"
    assert resolve_backend("xgrammar") == "xgrammar"
    with pytest.raises(InvalidParameterError) as caught:
        EngineConfig(structured_outputs_backend="outlines")
    assert caught.value.field == "structured_outputs_backend"
    for flag in ("--structured-outputs-backend", "--structured-outputs-config.backend", "--guided-decoding-backend"):
        args = build_parser().parse_args(["serve", flag, "xgrammar"])
        assert args.structured_outputs_backend == "xgrammar"
    assert build_parser().parse_args(["serve"]).structured_outputs_backend == "auto"


def test_shared_compilers_are_per_backend(smollm2_tokenizer) -> None:
    xg = shared_compiler(smollm2_tokenizer, VOCAB, "xgrammar")
    assert xg.backend.name == "xgrammar" and shared_compiler(smollm2_tokenizer, VOCAB, "xgrammar") is xg
    assert shared_compiler(smollm2_tokenizer, VOCAB, "guidance").backend.name == "llguidance"


@pytest.mark.parametrize("name", sorted(set(SCHEMAS) - UNENFORCED))
def test_each_schema_compiles_and_accepts_a_valid_text(backend, smollm2_tokenizer, name: str) -> None:
    matcher = backend.compile(StructuredOutputsParams(json=SCHEMAS[name])).matcher()
    assert_valid_json(VALID[name], SCHEMAS[name])  # the text itself is right
    for token in smollm2_tokenizer.encode(VALID[name], add_special_tokens=False):
        assert matcher.accept_token(token), matcher.error
    assert not matcher.is_terminated()  # complete, but it ends on EOS only
    assert allowed(matcher) == {smollm2_tokenizer.eos_token_id}
    assert matcher.accept_token(smollm2_tokenizer.eos_token_id) and matcher.is_terminated()


def test_what_xgrammar_would_not_enforce_is_a_400_naming_the_field(compiler) -> None:
    for name in UNENFORCED:
        with pytest.raises(InvalidParameterError) as caught:
            compiler.compile(StructuredOutputsParams(json=SCHEMAS[name]))
        assert caught.value.field == "structured_outputs.json" and "multipleOf" in caught.value.message
    assert unenforced_keyword({"not": {"type": "string"}}) == "not"
    assert unenforced_keyword({"type": "object", "properties": {"a": {"if": {}, "then": {}}}}) == "if"
    assert unenforced_keyword({"allOf": [{"type": "object"}, {"required": ["a"]}]}).startswith("allOf")
    assert unenforced_keyword({"type": "integer", "multipleOf": 3}) is None
    assert unenforced_keyword({"enum": [{"not": 1}]}) is None  # data, not a schema
    assert unenforced_keyword(SCHEMAS["nested_object"]) is None


@pytest.mark.parametrize("spec", [StructuredOutputsParams(regex=REGEX), StructuredOutputsParams(choice=CHOICES),
                                  StructuredOutputsParams(grammar=LARK)], ids=["regex", "choice", "lark"])
def test_masks_equal_llguidance_on_regex_choice_and_lark(backend, smollm2_tokenizer, spec) -> None:
    from compiled_serve.structured.llguidance_backend import LLGuidanceBackend

    text = {"regex": "yes, 12 cats", "choice": "neutral", "grammar": "1+2+3"}[spec.kind]
    theirs = LLGuidanceBackend(smollm2_tokenizer, VOCAB).compile(spec).matcher()
    ours = backend.compile(spec).matcher()
    for token in smollm2_tokenizer.encode(text, add_special_tokens=False) + [smollm2_tokenizer.eos_token_id]:
        assert allowed(ours) == allowed(theirs)
        assert ours.accept_token(token) and theirs.accept_token(token)
    assert ours.is_terminated()


def test_json_masks_allow_no_special_token_and_no_raw_control_character(backend, smollm2_tokenizer) -> None:
    """Inside a length-bounded string, xgrammar alone would allow `<|im_start|>` (read as its
    text) and raw control bytes (not JSON); the backend keeps both out."""
    matcher = backend.compile(StructuredOutputsParams(json=SCHEMAS["nested_object"])).matcher()
    for token in smollm2_tokenizer.encode('{"name":"A', add_special_tokens=False):
        assert matcher.accept_token(token)
    inside = allowed(matcher)
    assert len(inside) > 40_000  # free text
    special = {i for i, t in smollm2_tokenizer.added_tokens_decoder.items() if t.special}
    assert not inside & special
    control = {t for t in range(VOCAB) if any(ord(c) < 0x20 for c in smollm2_tokenizer.decode([t]))}
    assert control and not inside & control
    # A regex may want a control character: only JSON specs drop them.
    newline = backend.compile(StructuredOutputsParams(regex="a\nb")).matcher()
    assert newline.accept_token(smollm2_tokenizer.encode("a", add_special_tokens=False)[0])
    assert smollm2_tokenizer.encode("\n", add_special_tokens=False)[0] in allowed(newline)


def test_a_refused_token_is_error_state_and_rollback_restores(backend, smollm2_tokenizer) -> None:
    matcher = backend.compile(StructuredOutputsParams(regex="[0-9]+")).matcher()
    digits = smollm2_tokenizer.encode("12", add_special_tokens=False)
    assert matcher.accept_token(digits[0])
    after_one = allowed(matcher)
    assert not matcher.accept_token(smollm2_tokenizer.encode("x", add_special_tokens=False)[0])
    assert matcher.error is not None
    fresh = backend.compile(StructuredOutputsParams(regex="[0-9]+")).matcher()
    for token in digits * 2:
        assert fresh.accept_token(token)
    assert fresh.rollback(len(digits) * 2 - 1) and fresh.error is None
    assert allowed(fresh) == after_one


def deep_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    return schema


HOSTILE = {
    "nested_200": StructuredOutputsParams(json=deep_schema(200)),
    "enum_100k": StructuredOutputsParams(json={"enum": [f"value-{i}" for i in range(100_000)]}),
    "catastrophic_regex": StructuredOutputsParams(regex="(a{1000}){1000}"),
    "no_start_rule": StructuredOutputsParams(grammar='item: "a" | "b"'),
    "malformed_schema": StructuredOutputsParams(json={"type": "object", "required": "a"}),
    "bad_regex": StructuredOutputsParams(regex="(unclosed"),
    "bad_lark": StructuredOutputsParams(grammar="start: ("),
    "bad_gbnf": StructuredOutputsParams(grammar="root ::= missing"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_and_invalid_specs_are_a_bounded_400_naming_the_field(compiler, name: str) -> None:
    spec = HOSTILE[name]
    started = time.monotonic()
    with pytest.raises(InvalidParameterError) as caught:
        compiler.compile(spec)
    assert time.monotonic() - started < compiler.timeout_s + 1
    assert caught.value.field == spec.field
    assert ".cc:" not in caught.value.message and "\n" not in caught.value.message  # no C++ path, no echo


# ------------------------------------------------------------------ engine, real weights
@pytest.fixture(scope="module")
def llm():
    from compiled_serve.llm import LLM

    return LLM(compile_mode="graph", max_num_seqs=64, cpu_kv_cache_gib=0.5, structured_outputs_backend="xgrammar")


def sample(llm, spec: StructuredOutputsParams, count: int, max_tokens: int = 160) -> list[str]:
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, structured_outputs=spec)
    outputs = [o.outputs[0] for o in llm.generate([PROMPT] * count, params)]
    assert all(o.finish_reason == "stop" for o in outputs), [(o.finish_reason, o.text) for o in outputs]
    return [o.text for o in outputs]


def test_the_engine_uses_the_configured_backend(llm) -> None:
    engine = llm.llm_engine
    assert engine.structured.backend == "xgrammar"
    grammar = engine.structured.compile(SamplingParams(structured_outputs=StructuredOutputsParams(regex="a")))
    assert type(grammar).__name__ == "XGrammarGrammar"


@pytest.mark.parametrize("name", sorted(set(SCHEMAS) - UNENFORCED))
def test_every_output_validates_against_its_schema(llm, name: str) -> None:
    texts = sample(llm, StructuredOutputsParams(json=SCHEMAS[name]), count=8)
    for text in texts:
        assert_valid_json(text, SCHEMAS[name])
    assert len(set(texts)) > 1  # temperature 1.0 really samples


def test_regex_choice_and_lark_outputs_match(llm) -> None:
    for text in sample(llm, StructuredOutputsParams(regex=REGEX), count=8, max_tokens=40):
        assert re.fullmatch(REGEX, text), text
    for text in sample(llm, StructuredOutputsParams(choice=CHOICES), count=8, max_tokens=40):
        assert text in CHOICES
    for text in sample(llm, StructuredOutputsParams(grammar=LARK), count=8, max_tokens=40):
        assert LARK_OUTPUT.fullmatch(text), text


@pytest.mark.heavy
@pytest.mark.parametrize("name", sorted(set(SCHEMAS) - UNENFORCED))
def test_fifty_outputs_per_schema_validate(llm, name: str) -> None:
    for text in sample(llm, StructuredOutputsParams(json=SCHEMAS[name]), count=50):
        assert_valid_json(text, SCHEMAS[name])
