"""The engine-core process: builds the LLMEngine, then steps it and streams delta outputs back.

    server                                   core (this module)
    python -m compiled_serve.engine.core_process FD ──► core_main(conn)
    init {config, log_level} ───────────────► LLMEngine(config)
    ◄──────────────────── ready {model facts, tokenizer files, stats} | startup_error
    add / abort / stats / shutdown ─────────► drained before every engine.step()
    ◄──────────── step {acks, delta outputs of that step, stats}         one message per step

FD is the core's end of a socketpair, inherited from the server. The connection carries bytes
only (`send_bytes`/`recv_bytes`, msgpack: core_messages); nothing is ever pickled.
Requests run with `output_kind="delta", detokenize=False`: this process never detokenizes or
checks stop strings; the server does both and aborts a request whose stop string completed.

The core ignores SIGINT (a terminal's Ctrl-C reaches the whole process group; the server decides
when the core stops) and exits when told to or when the server's end of the pipe closes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from multiprocessing.connection import Connection
from typing import Any

from compiled_serve.engine.core_messages import (
    decode_config,
    decode_params,
    encode_error,
    encode_output,
    encode_stats,
    pack,
    unpack,
)

logger = logging.getLogger("compiled_serve.engine")

_IDLE_POLL_S = 0.05
_TOKENIZER_FILE_LIMIT = 64 * 2**20  # per file; tokenizer.json of a 256k vocabulary is ~30 MiB


def core_main(conn: Connection, *, own_process: bool = True) -> None:
    """Serves one server over `conn` until told to stop. `own_process` False (tests): leave the
    process's signal handlers and logging alone."""
    if own_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        init = unpack(conn.recv_bytes())
    except (EOFError, OSError):
        return
    if own_process:
        from compiled_serve.logging_setup import configure_logging

        configure_logging(init.get("log_level", "info"))
    try:
        from compiled_serve.startup import start_engine

        engine = start_engine(decode_config(init["config"]))
        ready = ready_message(engine)
    except Exception as exc:  # a bad model path, an unknown format, out of memory, ...
        logger.debug("engine start-up failed", exc_info=True)
        conn.send_bytes(pack({"type": "startup_error", "kind": type(exc).__name__, "message": str(exc)}))
        return
    if own_process:  # the engine core's process is ours: its start-up objects leave the collector's view
        from compiled_serve.long_lived_objects import freeze_long_lived_objects

        freeze_long_lived_objects()
    conn.send_bytes(pack(ready))
    CoreLoop(engine, conn).run()


def ready_message(engine: Any) -> dict[str, Any]:
    return {
        "type": "ready",
        "model": {"max_model_len": engine.max_model_len, "vocab_size": engine.model_config.vocab_size,
                  "max_logprobs": engine.config.max_logprobs, "max_n": engine.config.max_n,
                  "chat_template": engine.chat_template, "startup_report": engine.startup_report(),
                  "structured_outputs_backend": engine.config.structured_outputs_backend},
        "tokenizer_files": tokenizer_files(engine.tokenizer),
        "stats": encode_stats(engine.get_stats()),
    }


def tokenizer_files(tokenizer: Any) -> dict[str, bytes] | None:
    """The tokenizer as the files `save_pretrained` writes (tokenizer.json and its config)."""
    if tokenizer is None:
        return None
    with tempfile.TemporaryDirectory(prefix="compiled-serve-tokenizer-") as directory:
        tokenizer.save_pretrained(directory)
        files = {}
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if os.path.isfile(path) and os.path.getsize(path) <= _TOKENIZER_FILE_LIMIT:
                with open(path, "rb") as f:
                    files[name] = f.read()
        return files


class CoreLoop:
    """Drain commands, step, send the step's outputs; until shutdown or the server goes away."""

    def __init__(self, engine: Any, conn: Connection):
        self.engine = engine
        self.conn = conn

    def run(self) -> None:
        try:
            while self._iterate():
                pass
        except Exception as exc:  # the engine failed: tell the server, then exit
            logger.exception("engine core loop died")
            self._send({"type": "dead", "message": f"the engine core failed ({type(exc).__name__})"})
            raise SystemExit(1) from None

    def _iterate(self) -> bool:
        acks: list[dict[str, Any]] = []
        received = False
        timeout = 0.0 if self.engine.has_unfinished_requests() else _IDLE_POLL_S
        try:
            while self.conn.poll(timeout):
                timeout = 0.0
                received = True
                if not self._apply(unpack(self.conn.recv_bytes()), acks):
                    return False
        except (EOFError, OSError):  # the server is gone: nothing to serve
            return False
        outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
        if outputs or received:
            self._send({"type": "step", "acks": acks, "outputs": [encode_output(o) for o in outputs],
                        "stats": encode_stats(self.engine.get_stats())})
        return True

    def _apply(self, message: dict[str, Any], acks: list[dict[str, Any]]) -> bool:
        kind = message["type"]
        if kind == "add":
            try:
                self.engine.add_request(message["id"], message["prompt_token_ids"], decode_params(message["params"]),
                                        output_kind="delta", detokenize=False)
            except Exception as exc:  # InvalidParameterError and friends: the caller's 400
                acks.append({"id": message["id"], "error": encode_error(exc)})
            else:
                acks.append({"id": message["id"], "error": None})
        elif kind == "abort":
            for request_id in message["ids"]:
                self.engine.abort_request(request_id)
        elif kind == "stats":
            self._send({"type": "stats", "stats": encode_stats(self.engine.get_stats())})
        elif kind == "shutdown":
            return False  # the process exits: its KV cache goes with it
        return True

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.conn.send_bytes(pack(message))
        except (BrokenPipeError, EOFError, OSError):
            pass  # the server is gone; the next poll ends the loop


def _exit_now(code: int) -> None:
    """Exits without the interpreter's teardown of torch and the model's tensors (seconds on a
    small machine): the server waits for this process, and the KV cache needs no finalizing."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        core_main(Connection(int(sys.argv[1])))
    except SystemExit as exc:
        _exit_now(exc.code if isinstance(exc.code, int) else 1)
    _exit_now(0)
