"""`compiled-serve chat --url`: the terminal chat against a running server, driven through a pty
as a person types. The server is the real `compiled-serve serve` (a subprocess, the embedded
default model); the reference for each streamed reply is the same server's non-streamed answer
to the same conversation (greedy, so the two must agree)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_process import collect, free_port, serve_process, wait_listening
from test_chat import _read_until

from compiled_serve.chat_client import api_base

MAX_TOKENS = 12
SERVE_FLAGS = ["--compile-mode", "graph", "--max-num-seqs", "4", "--cpu-kv-cache-gib", "0.25",
               "--log-level", "warning"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    process = serve_process(SERVE_FLAGS, port, cache_root=tmp_path_factory.mktemp("cache"))
    stdout: list[str] = []
    stderr: list[str] = []
    readers = [collect(process.stdout, stdout), collect(process.stderr, stderr)]
    try:
        wait_listening(process, stdout, stderr, timeout_s=300)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)
        for reader in readers:
            reader.join(10)


def _reference(base_url: str, messages: list[dict]) -> str:
    body = {"model": _model(base_url), "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _model(base_url: str) -> str:
    return httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]


def _chat(base_url: str, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "compiled_serve.cli", "chat", "--url", base_url, "--max-tokens", str(MAX_TOKENS),
         "--temperature", "0", *extra], stdin=follower, stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    return process, leader


@pytest.mark.heavy
@pytest.mark.parametrize("quit_with", [b"/exit\n", b"\x04"], ids=["exit", "ctrl-d"])
def test_chat_url_streams_two_turns_through_a_pty_and_quits(server: str, quit_with: bytes) -> None:
    turns = ["Hello! What is your name?", "Say it again."]
    process, leader = _chat(server)
    screen = b""
    try:
        screen = _read_until(leader, b">>> ", screen, timeout_s=60)
        for turn in turns:
            start = len(screen)
            os.write(leader, turn.encode() + b"\n")
            screen = screen[:start] + _read_until(leader, b">>> ", screen[start:], timeout_s=120)
        os.write(leader, quit_with)
        assert process.wait(30) == 0, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)
    stderr = process.stderr.read().decode() if process.stderr else ""
    assert "Traceback" not in stderr, stderr
    text = screen.replace(b"\r\n", b"\n").decode()
    assert f"(model {_model(server)})" in text  # the model came from /v1/models
    messages: list[dict] = []
    for turn in turns:  # each reply, streamed, is the server's own answer to the conversation so far
        messages.append({"role": "user", "content": turn})
        reply = _reference(server, messages)
        assert reply and f"{turn}\n{reply}\n>>> " in text, (reply, text)
        messages.append({"role": "assistant", "content": reply})


def test_chat_url_says_when_the_server_is_unreachable() -> None:
    result = subprocess.run([sys.executable, "-m", "compiled_serve.cli", "chat", "--url",
                             f"http://127.0.0.1:{free_port()}"], input="hello\n", capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "compiled-serve chat: error: cannot reach http://127.0.0.1:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("url", ["http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/"])
def test_api_base_accepts_the_url_with_or_without_v1(url: str) -> None:
    assert api_base(url) == "http://h:8000/v1"


def test_chat_url_refuses_a_local_chat_template(tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    result = subprocess.run([sys.executable, "-m", "compiled_serve.cli", "chat", "--url", "http://127.0.0.1:1",
                             "--chat-template", str(template)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--chat-template applies to the in-process chat" in result.stderr
