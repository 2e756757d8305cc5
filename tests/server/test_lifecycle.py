"""Server lifecycle: graceful shutdown, a dead engine loop, metrics, chat-template opt-in, CLI.

Each test starts its own server on the shared engine (cheap: the engine is already built).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
from live_server import MINILM_DIR, generation_server

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def _stream_lines(base_url: str, body: dict[str, Any], out: list[str], first: threading.Event) -> None:
    try:
        with httpx.Client(base_url=base_url, timeout=60) as client, \
                client.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line:
                    out.append(line)
                    first.set()
    except httpx.HTTPError:
        out.append("<connection closed>")
    first.set()


def test_graceful_shutdown_finishes_short_and_aborts_long_requests(engine) -> None:
    server = generation_server(engine, shutdown_timeout_s=1.0)
    live = next(server)
    short: list[str] = []
    long: list[str] = []
    events = [threading.Event(), threading.Event()]
    threads = [
        threading.Thread(target=_stream_lines, args=(live.base_url, {"prompt": "One", "max_tokens": 12,
                                                                     "stream": True}, short, events[0])),
        threading.Thread(target=_stream_lines, args=(live.base_url, {"prompt": "Two", "max_tokens": 4000,
                                                                     "ignore_eos": True, "stream": True},
                                                     long, events[1])),
    ]
    for thread in threads:
        thread.start()
    for event in events:
        assert event.wait(60)
    server.close()  # uvicorn drains, then the engine loop aborts what is left and stops
    for thread in threads:
        thread.join(60)
    assert short[-1] == "data: [DONE]"
    finish = [c["finish_reason"] for line in short[:-1] for c in json.loads(line[6:])["choices"]]
    assert finish[-1] == "length"
    assert long[-1] != "data: [DONE]" or any('"shutting_down"' in line or '"abort"' in line for line in long)
    assert not live.thread.is_alive()
    stats = engine.get_stats()  # the engine thread has stopped: the engine is ours to inspect
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not engine.has_unfinished_requests()


def test_health_turns_503_when_the_engine_loop_dies(engine) -> None:
    server = generation_server(engine)
    live = next(server)
    real_step = engine.step

    def broken_step() -> Any:
        raise RuntimeError("injected fault in /secret/path")

    engine.step = broken_step  # fault injection: the real engine, one step that fails
    try:
        with live.client() as http:
            response = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert response.status_code == 503
            assert "/secret/path" not in response.text and "RuntimeError" not in response.text
            assert http.get("/health").status_code == 503
            assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 503
    finally:
        del engine.step
        assert engine.step == real_step
        server.close()
        for request_id in list(engine._requests):  # the dead loop left one request behind
            engine.abort_request(request_id)
    assert engine.get_stats().num_free_blocks == engine.get_stats().num_total_blocks


def test_metrics_record_latencies_and_engine_counters(engine) -> None:
    server = generation_server(engine)
    live = next(server)
    try:
        with live.client() as http:
            before = engine.get_stats().generation_tokens_total
            assert http.post("/v1/completions", json={"prompt": "Count: 1, 2,", "max_tokens": 5}).status_code == 200
            text = http.get("/metrics").text
    finally:
        server.close()
    # Every series carries model_name (test_operator_logs checks it); keyed here without it.
    def without_model_name(series: str) -> str:
        return re.sub(r',?model_name="[^"]*"', "", re.sub(r'model_name="[^"]*",', "", series)).replace("{}", "")

    values = {without_model_name(line.split(" ")[0]): float(line.split(" ")[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    assert values["compiled_serve_time_to_first_token_seconds_count"] >= 1
    assert values["compiled_serve_inter_token_latency_seconds_count"] >= 4
    assert values["compiled_serve_e2e_request_latency_seconds_count"] >= 1
    assert values["compiled_serve_request_queue_time_seconds_count"] >= 1
    assert values["compiled_serve_generation_tokens_total"] >= before + 5
    assert values['compiled_serve_request_success_total{finished_reason="length"}'] >= 1
    assert values["compiled_serve_num_requests_running"] == 0
    assert 0 <= values["compiled_serve_kv_cache_usage_perc"] <= 1


def test_request_chat_template_is_opt_in(engine) -> None:
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    for allowed in (False, True):
        server = generation_server(engine, allow_request_chat_template=allowed)
        live = next(server)
        try:
            with live.client() as http:
                response = http.post("/v1/chat/completions", json=CHAT | {"chat_template": template})
                if allowed:
                    assert response.status_code == 200, response.text
                else:
                    assert response.status_code == 400
                    assert response.json()["error"]["param"] == "chat_template"
                assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        finally:
            server.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serve_prints_startup_report_and_serves_embeddings() -> None:
    port = _free_port()
    env = os.environ | {"COMPILED_SERVE_API_KEY": "cli-key"}
    process = subprocess.Popen(
        [sys.executable, "-m", "compiled_serve.cli", "serve", "--model", str(MINILM_DIR), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines: list[str] = []
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "listening" in line:
                break
        report = "".join(lines)
        assert "BertModel" in report and f"http://127.0.0.1:{port}" in report and "API key required" in report
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "hi"},
                                      headers={"Authorization": "Bearer cli-key"})
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 384
    finally:
        process.terminate()
        process.wait(30)
