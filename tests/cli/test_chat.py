"""`compiled-serve chat`: each turn's streamed reply equals what the offline `LLM.chat` API returns
for the same conversation (the reference), through a StringIO, a pipe and a pty."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_chat_model import dummy_flags, write_tiny_chat_model

from compiled_serve.chat_repl import run_chat
from compiled_serve.config import EngineConfig
from compiled_serve.llm import LLM
from compiled_serve.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> LLM:
    return LLM(**_config_fields(model_dir))


def _config_fields(model_dir: Path) -> dict:
    config = EngineConfig(model=str(model_dir), load_format="dummy", dtype="float32", compile_mode="graph",
                          num_kv_blocks=300, max_num_seqs=4)
    return {name: getattr(config, name) for name in ("model", "load_format", "dtype", "compile_mode",
                                                     "num_kv_blocks", "max_num_seqs")}


def _reference_replies(llm: LLM, turns: list[str]) -> list[str]:
    messages: list[dict] = []
    replies = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        reply = llm.chat(messages, GREEDY, use_progress=False)[0].outputs[0].text
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def test_chat_streams_each_reply_and_keeps_the_conversation(reference: LLM) -> None:
    turns = ["hello", "world again"]
    out = io.StringIO()
    assert run_chat(reference.llm_engine, GREEDY, io.StringIO("\n".join(turns) + "\n"), out) == 0
    expected = _reference_replies(reference, turns)
    assert all(expected) and expected[0] != expected[1]  # the second turn saw the first
    assert out.getvalue() == "".join(reply + "\n" for reply in expected)


def test_reset_forgets_the_conversation(reference: LLM) -> None:
    out = io.StringIO()
    run_chat(reference.llm_engine, GREEDY, io.StringIO("hello\n/reset\nhello\n/exit\nworld\n"), out)
    first = _reference_replies(reference, ["hello"])[0]
    assert out.getvalue() == f"{first}\n{first}\n"  # /exit stops before "world"


@pytest.mark.heavy
def test_chat_command_with_piped_stdin(model_dir: Path, reference: LLM) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "compiled_serve.cli", "chat", *dummy_flags(model_dir), "--max-tokens", "8",
         "--temperature", "0"], input="hello\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == _reference_replies(reference, ["hello"])[0] + "\n"
    assert "engine ready in" in result.stderr  # the start-up phases went to the log, not to stdout


@pytest.mark.heavy
def test_chat_command_through_a_pty(model_dir: Path, reference: LLM) -> None:
    """On a terminal it prompts with `>>> ` and quits on Ctrl-D."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "compiled_serve.cli", "chat", *dummy_flags(model_dir), "--max-tokens", "8",
         "--temperature", "0", "--log-level", "warning"], stdin=follower, stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    screen = b""
    try:
        screen = _read_until(leader, b">>> ", screen)
        os.write(leader, b"hello\n")
        screen = _read_until(leader, b">>> ", screen[screen.index(b">>> ") + 4:])
        os.write(leader, b"\x04")  # Ctrl-D: end of input
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)
    reply = _reference_replies(reference, ["hello"])[0]
    assert reply.encode() in screen.replace(b"\r\n", b"\n")


def _read_until(fd: int, marker: bytes, seen: bytes, timeout_s: float = 240) -> bytes:
    deadline = time.monotonic() + timeout_s
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} in {seen!r}"
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            seen += os.read(fd, 4096)
    return seen
