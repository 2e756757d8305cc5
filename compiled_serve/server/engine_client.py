"""Starting, reaching and stopping the engine-core process (compiled_serve.engine.core_process).

    client = EngineCoreClient.start(EngineConfig(...))   # spawns, waits for "ready" (the model load)
    app = build_app(ServerConfig(), engine=client)        # a ProcessEngineLoop talks to it
    ... serve ...
    client.close()                                         # shutdown message, then terminate/kill

Whoever starts the client closes it; server loops attach to it and detach on shutdown, so tests
can share one core between several servers. The pipe carries msgpack bytes only
(`send_bytes`/`recv_bytes`, core_messages); it is a private parent-child channel, unauthenticated,
and never leaves the machine.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection
from typing import Any

from compiled_serve.config import EngineConfig
from compiled_serve.engine.core_messages import decode_stats, encode_config, pack, unpack
from compiled_serve.errors import CompiledServeError
from compiled_serve.server.engine_loop import ServedModel

logger = logging.getLogger("compiled_serve.server")

_READY_POLL_S = 0.2
_SHUTDOWN_WAIT_S = 2.0


class EngineCoreClient:
    """A started, ready engine-core process and the server's end of its pipe."""

    def __init__(self, process: Any, conn: Connection, ready: dict[str, Any]):
        self.process = process
        self.conn = conn
        model = ready["model"]
        self.served_model = ServedModel(
            tokenizer=rebuild_tokenizer(ready["tokenizer_files"]), chat_template=model["chat_template"],
            max_model_len=model["max_model_len"], vocab_size=model["vocab_size"],
            max_logprobs=model["max_logprobs"], startup_report=dict(model["startup_report"]),
            structured_outputs_backend=model.get("structured_outputs_backend", "auto"))
        self.max_n: int = model["max_n"]
        self.last_stats = decode_stats(ready["stats"])
        self._send_lock = threading.Lock()
        self._closed = False

    @classmethod
    def start(cls, config: EngineConfig, *, log_level: str = "info") -> EngineCoreClient:
        """Starts the core in a fresh interpreter and waits while it loads and compiles the model.
        A start-up failure (bad model path, out of memory, a crash) is a CompiledServeError.

        A plain subprocess rather than multiprocessing's spawn: spawn pickles its bootstrap and
        re-imports the parent's __main__ in the child; here nothing is pickled and the child
        imports only the core. The socketpair is wrapped in multiprocessing's Connection for its
        length-prefixed send_bytes/recv_bytes."""
        ours, theirs = socket.socketpair()
        process = CoreProcess(subprocess.Popen(
            [sys.executable, "-m", "compiled_serve.engine.core_process", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL))
        theirs.close()  # the core's end lives only in the core now: its exit reads as EOF here
        # The tokenizer is rebuilt and the app built here once the core is ready; import
        # transformers and the app (~1.5 s of CPU) while the core loads instead of after.
        threading.Thread(target=_preimport, name="preimport", daemon=True).start()
        conn = Connection(ours.detach())
        try:
            conn.send_bytes(pack({"type": "init", "config": encode_config(config), "log_level": log_level}))
            ready = _await_ready(process, conn)
            return cls(process, conn, ready)
        except BaseException:
            _stop_process(process, 0.0)
            conn.close()
            raise

    def startup_report(self) -> dict[str, Any]:
        return self.served_model.startup_report

    @property
    def alive(self) -> bool:
        return not self._closed and self.process.is_alive()

    def send(self, message: bytes) -> None:
        with self._send_lock:
            self.conn.send_bytes(message)

    def close(self, timeout_s: float = _SHUTDOWN_WAIT_S) -> None:
        """Asks the core to exit, then terminates (and at last kills) it; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.send(pack({"type": "shutdown"}))
        except OSError:
            pass  # already gone
        _stop_process(self.process, timeout_s)
        self.conn.close()


class CoreProcess:
    """The core's Popen with multiprocessing.Process's names (is_alive, exitcode, join)."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.pid = popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        self.popen.terminate()

    def kill(self) -> None:
        self.popen.kill()


def _await_ready(process: Any, conn: Connection) -> dict[str, Any]:
    while True:
        try:
            message = unpack(conn.recv_bytes()) if conn.poll(_READY_POLL_S) else None
        except (EOFError, OSError):
            message = None
        if message is None:
            if process.is_alive():
                continue
            process.join(1.0)
            raise CompiledServeError(f"the engine core process exited (code {process.exitcode}) before it was "
                                     "ready; its log above says why")
        if message["type"] == "ready":
            return message
        if message["type"] == "startup_error":
            raise CompiledServeError(str(message["message"]))
        raise CompiledServeError(f"the engine core sent {message['type']!r} before it was ready")


def _stop_process(process: Any, timeout_s: float) -> None:
    process.join(timeout_s)
    if process.is_alive():
        process.terminate()
        process.join(1.0)
    if process.is_alive():
        process.kill()
        process.join(1.0)


def _preimport() -> None:
    try:
        from transformers import AutoTokenizer  # noqa: F401

        import compiled_serve.server.app  # noqa: F401
    except Exception:  # noqa: BLE001  (the main thread imports them again and reports)
        pass


def rebuild_tokenizer(files: dict[str, bytes] | None) -> Any:
    """The core's tokenizer, from the files its `save_pretrained` wrote (no remote code)."""
    if files is None:
        return None
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="compiled-serve-tokenizer-") as directory:
        for name, data in files.items():
            if os.path.basename(name) != name or name.startswith("."):
                raise CompiledServeError(f"the engine core sent a tokenizer file with a bad name: {name!r}")
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        return AutoTokenizer.from_pretrained(directory)
