"""Each sampling limit has one source of truth (the `*_BOUNDS` of compiled_serve.sampling_params):
a value `SamplingParams` rejects is rejected through the HTTP API too (400 naming the field), and
a value at the edge of a range that `SamplingParams` accepts is served."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from live_server import generation_server

from compiled_serve import sampling_params as sp
from compiled_serve.errors import InvalidParameterError
from compiled_serve.sampling_params import Bounds, SamplingParams

OK_COMPLETION = {"prompt": "Hello", "max_tokens": 1, "temperature": 0}
LIMITS: dict[str, Bounds] = {
    "n": sp.N_BOUNDS, "temperature": sp.TEMPERATURE_BOUNDS, "top_p": sp.TOP_P_BOUNDS, "top_k": sp.TOP_K_BOUNDS,
    "min_p": sp.MIN_P_BOUNDS, "repetition_penalty": sp.REPETITION_PENALTY_BOUNDS,
    "presence_penalty": sp.PRESENCE_PENALTY_BOUNDS, "frequency_penalty": sp.FREQUENCY_PENALTY_BOUNDS,
    "seed": sp.SEED_BOUNDS, "max_tokens": sp.MAX_TOKENS_BOUNDS, "min_tokens": sp.MIN_TOKENS_BOUNDS,
    "logprobs": sp.LOGPROBS_BOUNDS,
}


def _step(bounds: Bounds) -> float:
    return 1 if isinstance(bounds.low, int) else 0.5


def _outside(bounds: Bounds) -> list[Any]:
    values = [bounds.low if bounds.low_open else bounds.low - _step(bounds)]
    if bounds.high is not None:
        values.append(bounds.high + _step(bounds))
    return values


def _edges(bounds: Bounds) -> list[Any]:
    return ([] if bounds.low_open else [bounds.low]) + ([] if bounds.high is None else [bounds.high])


OUTSIDE = [(field, value) for field, bounds in LIMITS.items() for value in _outside(bounds)]
EDGES = [(field, value) for field, bounds in LIMITS.items() for value in _edges(bounds)]


@pytest.fixture(scope="module")
def http(engine: Any) -> Any:
    server = generation_server(engine)
    with next(server).client() as client:
        yield client
    server.close()  # stops the live server


@pytest.mark.parametrize("field, value", OUTSIDE)
def test_rejected_by_sampling_params_and_by_the_api(http: httpx.Client, field: str, value: Any) -> None:
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
    response = http.post("/v1/completions", json=OK_COMPLETION | {field: value})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


@pytest.mark.parametrize("field, value", EDGES)
def test_edges_accepted_by_sampling_params_and_by_the_api(http: httpx.Client, field: str, value: Any) -> None:
    SamplingParams(**{field: value})
    response = http.post("/v1/completions", json=OK_COMPLETION | {field: value})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("bias", [sp.LOGIT_BIAS_BOUNDS.low - 0.5, sp.LOGIT_BIAS_BOUNDS.high + 0.5])
def test_logit_bias_limit_is_shared(http: httpx.Client, bias: float) -> None:
    with pytest.raises(InvalidParameterError, match="logit_bias"):
        SamplingParams(logit_bias={5: bias})
    response = http.post("/v1/completions", json=OK_COMPLETION | {"logit_bias": {"5": bias}})
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("logit_bias")
