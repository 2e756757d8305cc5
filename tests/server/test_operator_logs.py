"""What the operator sees of a running server: an access-log line per request (method, path, status,
latency, tokens equal to the response's usage), the periodic engine line while there is work and
none while idle, and Prometheus metrics with a model_name label on every series and no _created
series. Against the real engine in its own process; `tests/cli/test_serve_operator_log.py` checks
the same lines on a real `compiled-serve serve`'s stderr, and that --disable-access-log and
--log-stats-interval 0 remove them (not here: a second server may not attach to the shared core
while this module's is attached)."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

import httpx
import pytest
from live_server import generation_server
from prometheus_client.parser import text_string_to_metric_families

MODEL = "SmolLM2-135M-Instruct"
KEY = "ops-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
INTERVAL_S = 0.3
GENERATED = 64  # tokens the periodic-line test generates: decode must outlast one INTERVAL_S, so that an
# interval ends while the request runs (16 tokens at the quantized default's ~50-100 tok/s did not, in CI)
ACCESS = re.compile(r'^127\.0\.0\.1:\d+ "(?P<method>[A-Z]+) (?P<path>\S+)" (?P<status>\d{3}) (?P<latency>\d+\.\d{3})s'
                    r'(?: prompt_tokens=(?P<prompt>\d+) completion_tokens=(?P<completion>\d+))?$')
ENGINE = re.compile(r"^engine: prompt (?P<prompt>[\d.]+) tok/s, generation (?P<generation>[\d.]+) tok/s, "
                    r"running (?P<running>\d+), waiting (?P<waiting>\d+), KV cache (?P<kv>[\d.]+)% used, "
                    r"prefix-cache hits (?P<hits>[\d.]+%|-)$")


@pytest.fixture(scope="module")
def live(core):
    yield from generation_server(core, api_key=KEY, log_stats_interval_s=INTERVAL_S)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="compiled_serve")
    return caplog


def _lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def _access(caplog: pytest.LogCaptureFixture, path: str) -> list[re.Match[str]]:
    matches = [ACCESS.match(line) for line in _lines(caplog, "compiled_serve.access")]
    assert all(matches), _lines(caplog, "compiled_serve.access")
    return [m for m in matches if m is not None and m["path"] == path]


def test_access_line_per_request_with_the_usage_tokens(live, logs) -> None:
    with live.client(headers=AUTH) as http:
        started = time.perf_counter()
        response = http.post("/v1/completions", json={"model": MODEL, "prompt": "One, two,", "max_tokens": 6, "n": 2})
        took = time.perf_counter() - started
        assert response.status_code == 200
        usage = response.json()["usage"]
        assert http.get("/v1/models/no-such-model").status_code == 404
    assert httpx.get(live.base_url + "/v1/models").status_code == 401  # refused by the guard: logged too
    [line] = _access(logs, "/v1/completions")
    assert (line["method"], line["status"]) == ("POST", "200")
    assert (int(line["prompt"]), int(line["completion"])) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert 0 < float(line["latency"]) <= took + 0.01
    [missing] = _access(logs, "/v1/models/no-such-model")
    assert (missing["method"], missing["status"], missing["prompt"]) == ("GET", "404", None)
    [refused] = _access(logs, "/v1/models")
    assert refused["status"] == "401"


def test_a_stream_is_logged_when_it_ends_with_its_tokens(live, logs) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 8,
            "stream": True, "stream_options": {"include_usage": True}}
    events = []
    with live.client(headers=AUTH) as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                if not events:
                    assert not _access(logs, "/v1/chat/completions")  # still streaming: no line yet
                events.append(line.removeprefix("data: "))
    usage = json.loads(events[-2])["usage"]
    deadline = time.monotonic() + 5
    while not _access(logs, "/v1/chat/completions") and time.monotonic() < deadline:
        time.sleep(0.02)  # the line comes once the server has sent the last byte
    [line] = _access(logs, "/v1/chat/completions")
    assert line["status"] == "200"
    assert (int(line["prompt"]), int(line["completion"])) == (usage["prompt_tokens"], usage["completion_tokens"])


def test_periodic_engine_line_while_busy_and_quiet_when_idle(live, logs) -> None:
    time.sleep(3 * INTERVAL_S)
    logs.clear()
    time.sleep(3 * INTERVAL_S)
    assert not _lines(logs, "compiled_serve.stats")  # idle: nothing
    with httpx.Client(base_url=live.base_url, headers=AUTH, timeout=300) as http:  # loaded CI: ~1 token/s seen
        response = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": GENERATED,
                                                      "ignore_eos": True})
    assert response.status_code == 200
    time.sleep(2 * INTERVAL_S)  # the interval in which the request finished
    busy = _lines(logs, "compiled_serve.stats")
    matches = [ENGINE.match(line) for line in busy]
    assert matches and all(matches), busy
    assert any(float(m["generation"]) > 0 and int(m["running"]) == 1 for m in matches if m), busy
    assert any(float(m["prompt"]) > 0 for m in matches if m), busy
    assert all(0 <= float(m["kv"]) <= 100 for m in matches if m)
    # The rates add up to the tokens generated: each interval's rate times its length, which is
    # INTERVAL_S or, on a loaded machine, somewhat more (hence the loose lower bound).
    generated = sum(float(m["generation"]) for m in matches if m) * INTERVAL_S
    assert GENERATED * 0.25 <= generated <= GENERATED * 1.2, busy
    logs.clear()
    time.sleep(3 * INTERVAL_S)
    assert not _lines(logs, "compiled_serve.stats")  # idle again


def _families(live: Any) -> list[Any]:
    with live.client(headers=AUTH) as http:
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
        text = http.get("/metrics").text
    assert "_created" not in text
    return list(text_string_to_metric_families(text))


def test_metrics_carry_model_name_and_no_created_series(live) -> None:
    families = _families(live)
    names = {f.name for f in families}
    for name in ("compiled_serve_time_to_first_token_seconds", "compiled_serve_e2e_request_latency_seconds",
                 "compiled_serve_request_success", "compiled_serve_num_requests_running",
                 "compiled_serve_kv_cache_usage_perc", "compiled_serve_generation_tokens",
                 "compiled_serve_request_rejected"):
        assert name in names, name
    samples = [s for f in families for s in f.samples]
    assert samples and all(s.labels.get("model_name") == MODEL for s in samples), \
        [s for s in samples if s.labels.get("model_name") != MODEL][:3]
    assert not [s for s in samples if s.name.endswith("_created")]
    finished = [s for s in samples if s.name == "compiled_serve_request_success_total"]
    assert any(s.labels["finished_reason"] == "length" and s.value >= 1 for s in finished)
