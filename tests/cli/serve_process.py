"""`compiled-serve serve` in a subprocess, as a user starts it: a free port, a build cache of the
test's own when asked, and a wait for the "listening" line (printed only once it listens)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_process(flags: list[str], port: int, cache_root: Path | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    if cache_root is not None:  # a build cache of its own: this start compiles, never a hit from another test
        env["COMPILED_SERVE_CACHE_ROOT"] = str(cache_root)
    return subprocess.Popen([sys.executable, "-m", "compiled_serve.cli", "serve", *flags, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def collect(stream: object, into: list[str]) -> threading.Thread:
    """Reads a pipe's lines into `into` on a thread (a full pipe would block the server)."""
    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.append(line.rstrip("\n"))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def wait_listening(process: subprocess.Popen[str], stdout: list[str], stderr: list[str],
                   timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not any("listening" in line for line in stdout):
        assert process.poll() is None and time.monotonic() < deadline, "\n".join(stderr)
        time.sleep(0.05)
