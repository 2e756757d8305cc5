"""ProcessEngineLoop: the HTTP layer's engine loop when the engine runs in its own process.

The event loop tokenizes, checks and packs each request, then a writer thread sends it (a full
pipe never blocks the event loop). A reader thread receives one message per engine step, turns
each delta output into the cumulative RequestOutput the endpoints consume (detokenizing and
applying stop strings: server/output_assembler.py), aborts in the core a request whose stop
string completed, and hands the outputs to the requests' queues. SSE and detokenization thus
run on the server's GIL, never on the engine's.

If the core dies (a crash, a kill, an engine error), the reader sees the pipe close: /health
turns 503, every in-flight request ends with a 503 error, new requests get 503.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any

from compiled_serve.engine.core_messages import (
    decode_error,
    decode_output,
    decode_stats,
    encode_params,
    pack,
    unpack,
)
from compiled_serve.errors import InvalidParameterError
from compiled_serve.server.engine_client import EngineCoreClient
from compiled_serve.server.engine_loop import EngineLoop, EngineLoopBase, EngineStoppedError
from compiled_serve.server.errors import EngineDeadError
from compiled_serve.server.metrics import ServerMetrics
from compiled_serve.server.output_assembler import RequestAssembler

logger = logging.getLogger("compiled_serve.server")

_READ_POLL_S = 0.1
_SYNC_TIMEOUT_S = 10.0
_INLINE_TOKENIZE_CHARS = 4096  # longer prompts tokenize in a worker thread


def open_engine_loop(engine: Any, **options: Any) -> EngineLoopBase:
    """The loop for `engine`: an EngineCoreClient (its own process) or an in-process LLMEngine."""
    if isinstance(engine, EngineCoreClient):
        return ProcessEngineLoop(engine, **options)
    return EngineLoop(engine, **options)


class ProcessEngineLoop(EngineLoopBase):
    def __init__(self, client: EngineCoreClient, *, max_waiting_requests: int = 256, retry_after_s: int = 1,
                 metrics: ServerMetrics | None = None):
        super().__init__(client.served_model, max_waiting_requests=max_waiting_requests,
                         retry_after_s=retry_after_s, metrics=metrics)
        self.client = client
        self._assemblers: dict[str, RequestAssembler] = {}
        self._acks: dict[str, asyncio.Future[None]] = {}
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._detaching = False

    # --- lifecycle (event-loop side) ---------------------------------------------------
    def _start(self) -> None:
        self._stats = self._fresh_stats()
        self._threads = [threading.Thread(target=self._read, name="engine-core-reader", daemon=True),
                         threading.Thread(target=self._write, name="engine-core-writer", daemon=True)]
        for thread in self._threads:
            thread.start()

    def _fresh_stats(self) -> Any:
        """Stats as of now (a shared core may still hold an earlier server's last messages: they are
        for requests nobody waits for any more, and the answer comes after them)."""
        deadline = time.monotonic() + _SYNC_TIMEOUT_S
        try:
            self.client.send(pack({"type": "stats"}))
            while time.monotonic() < deadline and self.client.conn.poll(max(0.0, deadline - time.monotonic())):
                message = unpack(self.client.conn.recv_bytes())
                if message["type"] == "stats":
                    self.client.last_stats = decode_stats(message["stats"])
                    break
        except (EOFError, OSError):
            pass  # a dead core: the reader finds out at once and /health says so
        return self.client.last_stats

    @property
    def alive(self) -> bool:
        return not self._dead and bool(self._threads) and self._threads[0].is_alive() and self.client.alive

    async def _stop(self) -> None:
        """Aborts what is still in flight and detaches from the core (whoever started it stops it)."""
        in_flight = list(self._streams)
        if in_flight:
            self._outbox.put(pack({"type": "abort", "ids": in_flight}))
        self._fail_streams(EngineStoppedError)
        self._fail_acks(EngineStoppedError)
        self._outbox.put(None)  # the writer sends what is queued, then exits
        self._detaching = True
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 5.0)

    # --- requests (event-loop side) ------------------------------------------------------
    async def _prepare(self, request_id: str, prompt: str | list[int], params: Any) -> Any:
        served = self.served_model
        params.validate_for_model(served.vocab_size, served.max_logprobs, self.client.max_n)
        if isinstance(prompt, str):
            text, ids = prompt, await self._tokenize(prompt)
        else:
            text, ids = None, list(prompt)
        try:
            message = pack({"type": "add", "id": request_id, "prompt_token_ids": ids,
                            "params": encode_params(params)})
        except (OverflowError, TypeError, ValueError):  # an id beyond 64 bits cannot be in any vocabulary
            raise InvalidParameterError(
                "prompt", f"token ids must be in the vocabulary [0, {served.vocab_size})") from None
        return message, RequestAssembler(request_id, text, ids, params, served.tokenizer)

    async def _tokenize(self, prompt: str) -> list[int]:
        """As the in-process engine does: special tokens added, an empty prompt refused."""
        tokenizer = self.served_model.tokenizer
        if not prompt:
            raise InvalidParameterError("prompt", "the prompt is empty")
        if tokenizer is None:
            raise InvalidParameterError("prompt", "this model has no tokenizer; pass token ids")

        def encode() -> list[int]:
            return list(tokenizer(prompt, add_special_tokens=True).input_ids)

        return await asyncio.to_thread(encode) if len(prompt) > _INLINE_TOKENIZE_CHARS else encode()

    def _submit_add(self, request_id: str, prepared: Any, done: asyncio.Future[None]) -> None:
        message, assembler = prepared
        self._assemblers[request_id] = assembler
        self._acks[request_id] = done
        self._outbox.put(message)

    def _submit_abort(self, request_id: str) -> None:
        self._outbox.put(pack({"type": "abort", "ids": [request_id]}))

    def _release(self, request_id: str, abort: bool) -> None:
        self._assemblers.pop(request_id, None)
        super()._release(request_id, abort)

    # --- writer and reader threads -------------------------------------------------------
    def _write(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self.client.send(message)
            except OSError:  # the core is gone; the reader notices and fails everything
                return

    def _read(self) -> None:
        try:
            while not self._detaching:
                if not self.client.conn.poll(_READ_POLL_S):
                    if not self.client.process.is_alive():
                        raise EOFError
                    continue
                message = unpack(self.client.conn.recv_bytes())
                if message["type"] == "dead":
                    logger.error("engine core: %s", message["message"])
                    raise EOFError
                if message["type"] == "step":
                    self._on_step(message, time.monotonic())
                elif message["type"] == "stats":
                    self._stats = self.client.last_stats = decode_stats(message["stats"])
        except (EOFError, OSError):
            self._die("the engine core process stopped")
        except Exception:
            logger.exception("engine core reader failed")
            self._die("the engine core reader failed")

    def _die(self, reason: str) -> None:
        if self._detaching:
            return
        self._dead = True
        logger.error("%s (exit code %s); failing in-flight requests", reason, self.client.process.exitcode)
        self._fail_streams(EngineDeadError)
        self._fail_acks(EngineDeadError)

    def _fail_acks(self, error_type: type[Exception]) -> None:
        for request_id in list(self._acks):
            future = self._acks.pop(request_id, None)
            if future is not None:
                self._resolve(future, error_type())
                self._pending.settled(1)

    def _on_step(self, message: dict[str, Any], now: float) -> None:
        # Stats first: a client that sees its request finish then sees it in the stats too.
        self._stats = self.client.last_stats = decode_stats(message["stats"])
        outputs = []
        for fields in message["outputs"]:
            assembler = self._assemblers.get(fields["id"])
            if assembler is None:
                continue  # aborted by its consumer, or a stopped request's last steps
            output = assembler.apply(decode_output(fields))
            if assembler.finished:
                self._assemblers.pop(fields["id"], None)
                if assembler.needs_abort:  # stop strings ended every sample: free it in the core
                    self._outbox.put(pack({"type": "abort", "ids": [fields["id"]]}))
            outputs.append(output)
        self._dispatch(outputs, now)
        for ack in message["acks"]:
            future = self._acks.pop(ack["id"], None)
            if future is None:
                continue  # an earlier server's request (a shared core)
            self._resolve(future, None if ack["error"] is None else decode_error(ack["error"]))
            self._pending.settled(1)
