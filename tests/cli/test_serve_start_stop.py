"""`compiled-serve serve` as a user runs it: a busy port fails before the model loads; the log has
one timestamped line per phase and agrees with the startup summary; "listening" is printed once the
server listens; Ctrl-C or SIGTERM mid-stream ends the stream with an error event and [DONE], with no traceback,
within the grace period plus a second."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_process import collect, free_port, serve_process, wait_listening
from tiny_chat_model import dummy_flags, write_tiny_chat_model

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR) ")
GRACE_S = 0.5


def _serve(model_dir: Path, port: int, *extra: str, cache_root: Path | None = None) -> subprocess.Popen[str]:
    return serve_process([*dummy_flags(model_dir), *extra], port, cache_root=cache_root)


def test_a_busy_port_fails_before_the_model_loads(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        start = time.monotonic()
        process = _serve(tmp_path / "never-read", port)
        stdout, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - start
    assert process.returncode != 0 and process.returncode == 2  # argparse's usage-error code
    assert f"cannot listen on 127.0.0.1:{port}" in stderr and "--port" in stderr
    assert "listening" not in stdout and "listening" not in stderr and "loading weights" not in stderr
    # Interpreter start-up, argument parsing and one bind (no torch import): measured 0.29-0.33 s
    # on the idle 2-core machine; the issue asks under a second, 3 s leaves room for a busy box.
    assert elapsed < 3, elapsed


def _stream_completion(base_url: str, events: list[str]) -> None:
    body = {"prompt": "hello", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(timeout=120) as client, client.stream("POST", f"{base_url}/v1/completions",
                                                                json=body) as response:
            for line in response.iter_lines():
                if line:
                    events.append(line)
    except httpx.HTTPError as exc:
        events.append(f"<{type(exc).__name__}>")


@pytest.mark.heavy
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_logs_listens_and_stops_cleanly_on_a_signal(tmp_path: Path, stop_signal: signal.Signals) -> None:
    """Ctrl-C (SIGINT) and an operator's or orchestrator's SIGTERM stop the same way."""
    model_dir = write_tiny_chat_model(tmp_path / "model")
    port = free_port()
    process = _serve(model_dir, port, "--shutdown-timeout", str(GRACE_S), cache_root=tmp_path / "cache")
    stdout: list[str] = []
    stderr: list[str] = []
    readers = [collect(process.stdout, stdout), collect(process.stderr, stderr)]
    try:
        wait_listening(process, stdout, stderr)
        base_url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base_url}/health").status_code == 200  # listening means listening: no retry
        events: list[str] = []
        client = threading.Thread(target=_stream_completion, args=(base_url, events))
        client.start()
        while len(events) < 3:
            assert client.is_alive(), events
            time.sleep(0.02)
        interrupted = time.monotonic()
        process.send_signal(stop_signal)
        assert process.wait(30) == 0
        stop_seconds = time.monotonic() - interrupted
        client.join(30)
    finally:
        if process.poll() is None:
            process.kill()
    for reader in readers:
        reader.join(10)

    assert stop_seconds < GRACE_S + 1.0, stop_seconds
    assert events[-1] == "data: [DONE]" and '"code":"shutting_down"' in events[-2], events[-3:]
    log = "\n".join(stderr)
    assert "Traceback" not in log and "CancelledError" not in log, log
    # One timestamped line per phase, each printed once.
    for line in stderr:
        if " INFO " in line or " WARNING " in line or " ERROR " in line:
            assert TIMESTAMP.match(line), line
    for phase in ("loading weights:", "loaded weights in", "compiling (warm-up steps)", "engine ready in"):
        assert sum(phase in line for line in stderr) == 1, (phase, log)
    # The summary's compile figure is the log's.
    summary = "\n".join(stdout)
    assert summary.index("compiled-serve: loaded") < summary.index("listening")
    assert sum("listening" in line for line in stdout) == 1
    logged = re.search(r"compile and warm-up ([\d.]+)s", log)
    reported = re.search(r"compile_status +compiled \d+ graph\(s\) in ([\d.]+)s", summary)  # a cold start
    assert logged and reported and logged.group(1) == reported.group(1), (log, summary)
    graphs = [int(n) for n in re.findall(r"compiled graph (\d+) ", log)]
    passes = [int(n) for n in re.findall(r"passes on graph (\d+):", log)]
    assert graphs == passes and graphs[0] == 0  # one numbering for both lines
