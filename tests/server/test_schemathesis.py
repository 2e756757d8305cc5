"""Property-based fuzzing of every operation in the server's own OpenAPI schema: zero 5xx.

Both schema-conforming (positive) and schema-violating (negative) requests are generated. The
schema is tightened for speed only (max_tokens <= 8, n <= 4, few prompts per batch); a
request without max_tokens gets 4, so no example generates for long on the CPU.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from live_server import LiveServer, generation_server

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.generation import GenerationMode  # noqa: E402

API_KEY = "fuzz-key"
MAX_EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 25}
_BOUNDS = {"max_tokens": 8, "max_completion_tokens": 8, "max_output_tokens": 8, "n": 4, "best_of": 4,
           "min_tokens": 8}


@pytest.fixture(scope="module")
def live(engine):
    yield from generation_server(engine, api_key=API_KEY, max_request_body_bytes=256 * 1024)


def _tighten(node: Any) -> None:
    """Caps generation-heavy numbers and batch sizes everywhere they appear in the schema."""
    if isinstance(node, dict):
        for name, sub in node.get("properties", {}).items():
            if name in _BOUNDS:
                for option in sub.get("anyOf", [sub]):
                    if option.get("type") == "integer":
                        option["maximum"] = min(option.get("maximum", _BOUNDS[name]), _BOUNDS[name])
        if node.get("type") == "array" and node.get("maxItems", 0) > 4:
            node["maxItems"] = 4
        for value in node.values():
            _tighten(value)
    elif isinstance(node, list):
        for value in node:
            _tighten(value)


def _bound_body(case: Any) -> None:
    body = case.body
    if isinstance(body, dict) and case.path in ("/v1/completions", "/v1/chat/completions"):
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if not isinstance(limit, int) or isinstance(limit, bool) or limit > 8:
            body["max_tokens"] = 4
            body.pop("max_completion_tokens", None)
        if isinstance(body.get("n"), int) and body["n"] > 4:
            body["n"] = 4
    if isinstance(body, dict) and case.path == "/v1/responses":
        limit = body.get("max_output_tokens")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit > 8:
            body["max_output_tokens"] = 4


def _operations(live: LiveServer) -> list[Any]:
    raw = copy.deepcopy(live.app.openapi())
    _tighten(raw)
    schema = schemathesis.openapi.from_dict(raw)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_server_errors(live: LiveServer, mode: GenerationMode) -> None:
    operations = _operations(live)
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/v1/models"}
    statuses: dict[int, int] = {}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    start_free = live.state.engine_loop.stats.num_free_blocks

    for operation in operations:

        @settings(max_examples=MAX_EXAMPLES[mode], deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            _bound_body(case)
            response = case.call(base_url=live.base_url, headers=headers, timeout=120)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.path, case.body, response.text)
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        try:
            run()
        except Unsatisfiable:
            # No schema-violating request exists (e.g. GET /health takes no input).
            assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET", operation.path

    print(f"{mode}: status counts {sorted(statuses.items())}")
    assert not any(code >= 500 for code in statuses)
    if mode is GenerationMode.POSITIVE:
        assert statuses.get(200, 0) > 0
    else:
        assert sum(n for code, n in statuses.items() if 400 <= code < 500) > 0
    with live.client(headers=headers) as http:
        assert http.get("/health").status_code == 200
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
    stats = live.state.engine_loop.stats
    assert stats.num_running == 0 and stats.num_free_blocks == start_free
