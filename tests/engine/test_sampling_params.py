from __future__ import annotations

import math

import pytest

from compiled_serve.errors import InvalidParameterError
from compiled_serve.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.logit_bias is None and p.seed is None and p.logprobs is None
    assert p.stop == [] and p.stop_token_ids == []
    assert (p.max_tokens, p.min_tokens, p.ignore_eos) == (16, 0, False)
    assert p.include_stop_str_in_output is False and p.skip_special_tokens is True
    assert not p.greedy


@pytest.mark.parametrize(
    "kwargs, greedy",
    [({"temperature": 0.0}, True), ({"temperature": 0}, True), ({"top_k": 1}, True),
     ({"temperature": 1e-7}, True), ({"temperature": 0.5}, False), ({"top_k": 2}, False),
     ({"top_k": -1}, False)],
)
def test_greedy(kwargs, greedy):
    assert SamplingParams(**kwargs).greedy is greedy


def test_normalization():
    p = SamplingParams(stop="###", stop_token_ids=(5, 7), logit_bias={"123": 5, 7: -1.5, " 42 ": 0})
    assert p.stop == ["###"]
    assert p.stop_token_ids == [5, 7]
    assert p.logit_bias == {123: 5.0, 7: -1.5, 42: 0.0}
    assert all(type(k) is int and type(v) is float for k, v in p.logit_bias.items())
    assert SamplingParams(stop=["a", "bc"]).stop == ["a", "bc"]
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert type(SamplingParams(temperature=1).temperature) is float


NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    "field, value",
    [
        # NaN / Inf anywhere a float goes.
        ("temperature", NAN), ("temperature", INF), ("top_p", NAN), ("min_p", NAN),
        ("repetition_penalty", NAN), ("repetition_penalty", INF), ("presence_penalty", -INF),
        ("frequency_penalty", NAN),
        # Wrong types; a bool is not an int (nor a float).
        ("n", True), ("n", 2.0), ("n", "2"), ("top_k", False), ("top_k", 1.5), ("max_tokens", True),
        ("max_tokens", 3.0), ("min_tokens", None), ("logprobs", True), ("logprobs", 1.0), ("seed", 1.0),
        ("seed", True), ("temperature", "1"), ("temperature", True), ("top_p", None),
        ("ignore_eos", 1), ("skip_special_tokens", "yes"), ("include_stop_str_in_output", None),
        ("stop", 5), ("stop", ["ok", 3]), ("stop", {"a": 1}), ("stop_token_ids", [1, True]),
        ("stop_token_ids", [1.0]), ("stop_token_ids", 5), ("logit_bias", [1, 2]),
        # Out of range.
        ("temperature", -0.1), ("temperature", 100.5), ("top_p", 0.0), ("top_p", 1.01), ("top_p", -1),
        ("top_k", -2), ("min_p", -0.01), ("min_p", 1.5), ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0), ("repetition_penalty", 10.5), ("top_k", 2**31), ("presence_penalty", 2.5), ("frequency_penalty", -2.01),
        ("n", 0), ("max_tokens", 0), ("min_tokens", -1), ("logprobs", -1), ("seed", 2**63),
        ("seed", -(2**63) - 1), ("stop", [""]), ("stop", ""), ("stop_token_ids", [-1]),
    ],
)
def test_rejects_bad_field(field, value):
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)


@pytest.mark.parametrize(
    "bias, bad",
    [({"abc": 1.0}, "abc"), ({1.5: 1.0}, "1.5"), ({True: 1.0}, "True"), ({-1: 1.0}, "-1"),
     ({"-3": 1.0}, "-3"), ({5: NAN}, "nan"), ({5: INF}, "inf"), ({5: 100.5}, "100.5"),
     ({5: -101}, "-101"), ({5: "1"}, "'1'"), ({5: True}, "True"), ({5: None}, "None")],
)
def test_rejects_bad_logit_bias(bias, bad):
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(logit_bias=bias)
    assert info.value.field.startswith("logit_bias")
    assert bad in str(info.value)


def test_messages_name_the_bad_value():
    with pytest.raises(InvalidParameterError, match=r"temperature.*\[0, 100\].*150"):
        SamplingParams(temperature=150)
    with pytest.raises(InvalidParameterError, match=r"top_p.*\(0, 1\].*0\.0"):
        SamplingParams(top_p=0.0)
    with pytest.raises(InvalidParameterError, match=r"must be an integer.*bool"):
        SamplingParams(n=True)


def test_min_tokens_bounded_by_max_tokens():
    SamplingParams(min_tokens=16, max_tokens=16)
    SamplingParams(min_tokens=1000, max_tokens=None)
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(min_tokens=17, max_tokens=16)
    assert info.value.field == "min_tokens"


def test_range_edges_accepted():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, presence_penalty=-2.0,
                   frequency_penalty=2.0, repetition_penalty=1e-3, logit_bias={0: -100, 1: 100},
                   seed=-(2**63), logprobs=0, min_tokens=0, max_tokens=1)
    SamplingParams(seed=2**63 - 1, temperature=100, top_p=1e-9, repetition_penalty=10.0, top_k=2**31 - 1)


MODEL = {"vocab_size": 100, "max_logprobs": 5, "max_n": 4}


@pytest.mark.parametrize(
    "kwargs, field",
    [({"logit_bias": {100: 1.0}}, "logit_bias"), ({"logit_bias": {"150": 1.0}}, "logit_bias"),
     ({"stop_token_ids": [3, 100]}, "stop_token_ids"), ({"logprobs": 6}, "logprobs"), ({"n": 5}, "n")],
)
def test_validate_for_model_rejects(kwargs, field):
    params = SamplingParams(**kwargs)
    with pytest.raises(InvalidParameterError) as info:
        params.validate_for_model(**MODEL)
    assert info.value.field == field


def test_validate_for_model_stop_caps():
    SamplingParams(stop=["x"] * 16).validate_for_model(**MODEL)
    SamplingParams(stop=["x" * 256]).validate_for_model(**MODEL)
    with pytest.raises(InvalidParameterError, match="stop"):
        SamplingParams(stop=["x"] * 17).validate_for_model(**MODEL)
    with pytest.raises(InvalidParameterError, match="stop"):
        SamplingParams(stop=["x" * 257]).validate_for_model(**MODEL)
    with pytest.raises(InvalidParameterError, match="stop"):
        SamplingParams(stop=["x", "yy"]).validate_for_model(**MODEL, max_stop_strings=1)
    with pytest.raises(InvalidParameterError, match="stop"):
        SamplingParams(stop=["xyz"]).validate_for_model(**MODEL, max_stop_len=2)


def test_validate_for_model_accepts_edges():
    SamplingParams(logit_bias={0: 1.0, 99: -1.0}, stop_token_ids=[99], logprobs=5, n=4).validate_for_model(**MODEL)
    SamplingParams(logprobs=0).validate_for_model(vocab_size=10, max_logprobs=0, max_n=1)
