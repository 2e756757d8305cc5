"""The operator's lines on a real `compiled-serve serve`'s stderr: the access-log line of a request
(timestamped, with method, path, status, latency and the response's token counts), the periodic
engine line while it generates, and neither with --disable-access-log / --log-stats-interval 0."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from tiny_chat_model import dummy_flags, write_tiny_chat_model

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO "


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_one_completion(model_dir: Path, *flags: str) -> tuple[dict, str]:
    """Starts serve, sends one completion once it listens, stops it with SIGINT; (usage, stderr)."""
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "compiled_serve.cli", "serve", *dummy_flags(model_dir),
                                "--port", str(port), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    stderr: list[str] = []
    pump = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
    pump.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "listening" in line:
                break
        else:
            raise AssertionError("serve exited before listening:\n" + "".join(stderr))
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                              json={"prompt": "hello world", "max_tokens": 24, "ignore_eos": True})
        assert response.status_code == 200, response.text
        time.sleep(1.5)  # a few stats intervals after it finished
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        pump.join(timeout=10)
    return response.json()["usage"], "".join(stderr)


def test_access_and_engine_lines_on_stderr(tmp_path: Path) -> None:
    model_dir = write_tiny_chat_model(tmp_path / "model")
    usage, stderr = _run_one_completion(model_dir, "--log-stats-interval", "0.2")
    access = re.search(STAMP + r'compiled_serve\.access: 127\.0\.0\.1:\d+ "POST /v1/completions" 200 [\d.]+s '
                       rf'prompt_tokens={usage["prompt_tokens"]} completion_tokens={usage["completion_tokens"]}$',
                       stderr, re.MULTILINE)
    assert access, stderr
    engine = re.findall(STAMP + r"compiled_serve\.stats: engine: prompt [\d.]+ tok/s, generation ([\d.]+) tok/s, "
                        r"running \d+, waiting \d+, KV cache [\d.]+% used, prefix-cache hits ([\d.]+%|-)$",
                        stderr, re.MULTILINE)
    assert any(float(generation) > 0 for generation, _ in engine), stderr


def test_disabled_lines_are_absent(tmp_path: Path) -> None:
    model_dir = write_tiny_chat_model(tmp_path / "model")
    _, stderr = _run_one_completion(model_dir, "--disable-access-log", "--log-stats-interval", "0")
    assert "compiled_serve.access" not in stderr and "compiled_serve.stats" not in stderr, stderr
    assert "Traceback" not in stderr
