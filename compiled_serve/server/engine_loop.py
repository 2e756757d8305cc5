"""The engine loops: what the HTTP layer talks to, whichever process runs the engine.

`EngineLoopBase` holds what both share: admission control, one asyncio queue per request,
latency metrics, abort when a consumer goes away (client disconnect, cancelled task, error),
which frees the request's KV blocks, and the graceful drain on shutdown.

`EngineLoop` (here) runs the (not thread-safe) engine on a dedicated thread of the server
process: the event loop posts `add`/`abort` commands to a queue that the thread drains before
each `engine.step()`, and outputs reach each request's queue through `loop.call_soon_threadsafe`.
`ProcessEngineLoop` (server/process_loop.py) talks to an engine-core process instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from compiled_serve.outputs import RequestOutput
from compiled_serve.server.errors import APIError, EngineDeadError, ServerBusyError
from compiled_serve.server.metrics import RequestTimer, ServerMetrics

logger = logging.getLogger("compiled_serve.server")

_IDLE_POLL_S = 0.05
_LIVENESS_POLL_S = 0.5


class EngineStoppedError(APIError):
    def __init__(self) -> None:
        super().__init__(503, "The server is shutting down; the request was aborted.", code="shutting_down")


@dataclass(frozen=True)
class ServedModel:
    """What the HTTP layer needs to know about the model, whichever process runs it."""

    tokenizer: Any
    chat_template: str | None
    max_model_len: int
    vocab_size: int
    max_logprobs: int
    startup_report: dict[str, Any]
    structured_outputs_backend: str = "auto"  # the engine's grammar backend: the server compiles with it too

    @classmethod
    def of_engine(cls, engine: Any) -> ServedModel:
        return cls(tokenizer=engine.tokenizer, chat_template=engine.chat_template,
                   max_model_len=engine.max_model_len, vocab_size=engine.model_config.vocab_size,
                   max_logprobs=engine.config.max_logprobs, startup_report=engine.startup_report(),
                   structured_outputs_backend=engine.config.structured_outputs_backend)


@dataclass
class _Stream:
    queue: asyncio.Queue[RequestOutput | BaseException]
    timer: RequestTimer
    tokens_seen: int = 0  # bookkeeping for inter-token latency
    scheduled: bool = False


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: Any
    done: asyncio.Future[None]


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Stop:
    """Ends the engine thread, aborting every request the engine still holds."""


@dataclass
class _Pending:
    lock: threading.Lock = field(default_factory=threading.Lock)
    adds: int = 0

    def settled(self, count: int) -> None:
        if count:
            with self.lock:
                self.adds -= count


class EngineLoopBase:
    """Subclasses implement `_start`, `_submit_add`, `_submit_abort`, `_stop` and `alive`."""

    def __init__(self, served_model: ServedModel, *, max_waiting_requests: int = 256, retry_after_s: int = 1,
                 metrics: ServerMetrics | None = None):
        self.served_model = served_model
        self.max_waiting_requests = max_waiting_requests
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self._streams: dict[str, _Stream] = {}
        self._pending = _Pending()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats: Any = None
        self._dead = False
        self._draining = False
        self._stopping: asyncio.Future[None] | None = None

    # --- lifecycle (event-loop side) ---------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._start()

    def _start(self) -> None:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    @property
    def stats(self) -> Any:
        """The EngineStats snapshot taken after the latest step (read-only; any thread)."""
        return self._stats

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def shutdown(self, timeout_s: float) -> None:
        """Refuse new work, let in-flight requests finish for `timeout_s`, abort the rest. A second
        call (uvicorn's shutdown, then the app's lifespan) waits for the first."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._drain_and_stop(timeout_s))
        await asyncio.shield(self._stopping)

    async def _drain_and_stop(self, timeout_s: float) -> None:
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while self._streams and self.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self._stop()

    async def _stop(self) -> None:
        raise NotImplementedError

    # --- requests (event-loop side) ------------------------------------------------------
    def _admit(self) -> None:
        if self._dead:
            raise EngineDeadError()
        if self._draining:
            raise EngineStoppedError()
        stats = self._stats
        waiting = (stats.num_waiting if stats is not None else 0) + self._pending.adds
        if waiting >= self.max_waiting_requests:
            if self.metrics is not None:
                self.metrics.requests_rejected.inc()
            raise ServerBusyError(self.retry_after_s, "The waiting queue is full; retry later.")

    async def add_request(self, request_id: str, prompt: str | list[int], params: Any,
                          arrival: float | None = None) -> RequestStream:
        """Admits and adds one request; returns its output stream once the engine accepted it.

        Raises ServerBusyError when the waiting queue is full, EngineDeadError / EngineStoppedError
        when the engine cannot take work, and the engine's InvalidParameterError for bad input.
        """
        assert self._loop is not None, "EngineLoop.start() was not called"
        self._admit()
        if request_id in self._streams:
            raise APIError(400, "Duplicate request id.", code="duplicate_request_id")
        prepared = await self._prepare(request_id, prompt, params)
        stream = _Stream(asyncio.Queue(), RequestTimer(self.metrics, arrival or time.monotonic()))
        done: asyncio.Future[None] = self._loop.create_future()
        with self._pending.lock:
            self._pending.adds += 1
        self._streams[request_id] = stream
        handle = RequestStream(self, request_id, stream)
        try:
            self._submit_add(request_id, prepared, done)
            # The engine side settles `done`; if it dies first, nobody will, so keep checking.
            while not done.done():
                await asyncio.wait({done}, timeout=_LIVENESS_POLL_S)
                if not done.done() and not self.alive:
                    raise EngineDeadError()
            done.result()
        except BaseException:
            handle.close()
            raise
        return handle

    async def _prepare(self, request_id: str, prompt: str | list[int], params: Any) -> Any:
        """Whatever must happen before the engine sees the request; raises for bad input."""
        raise NotImplementedError

    def _submit_add(self, request_id: str, prepared: Any, done: asyncio.Future[None]) -> None:
        """Hands the prepared request to the engine side, which settles `done` and `_pending`."""
        raise NotImplementedError

    def _submit_abort(self, request_id: str) -> None:
        raise NotImplementedError

    def _release(self, request_id: str, abort: bool) -> None:
        self._streams.pop(request_id, None)
        if abort:
            self._submit_abort(request_id)

    # --- engine side (any thread) ----------------------------------------------------------
    def _resolve(self, future: asyncio.Future[None], error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        self._call_soon(settle)

    def _push(self, stream: _Stream, item: RequestOutput | BaseException) -> None:
        self._call_soon(stream.queue.put_nowait, item)

    def _fail_streams(self, error_type: type[APIError]) -> None:
        for stream in list(self._streams.values()):
            self._push(stream, error_type())

    def _call_soon(self, callback: Any, *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is already closed: nobody is listening
            pass

    def _dispatch(self, outputs: list[RequestOutput], now: float) -> None:
        """Cumulative outputs to their streams, with the latency metrics."""
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # already aborted by its consumer
            if not stream.scheduled:
                stream.scheduled = True
                first = output.metrics.first_scheduled_time if output.metrics is not None else None
                stream.timer.scheduled(first if first is not None else now)
            tokens = sum(len(completion.token_ids) for completion in output.outputs)
            stream.timer.output(now, tokens - stream.tokens_seen)
            stream.tokens_seen = tokens
            if output.finished:
                stream.timer.finished(now, [completion.finish_reason for completion in output.outputs])
            self._push(stream, output)


class EngineLoop(EngineLoopBase):
    """The engine on a thread of the server process (`--no-engine-process`, and tests)."""

    def __init__(self, engine: Any, *, max_waiting_requests: int = 256, retry_after_s: int = 1,
                 metrics: ServerMetrics | None = None):
        super().__init__(ServedModel.of_engine(engine), max_waiting_requests=max_waiting_requests,
                         retry_after_s=retry_after_s, metrics=metrics)
        self.engine = engine
        self._commands: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Requests the engine holds (engine thread only). Not `_streams`: a consumer that leaves
        # after the stop was queued has dropped its stream, and its abort would come too late.
        self._in_engine: set[str] = set()

    def _start(self) -> None:
        self._stats = self.engine.get_stats()  # the engine thread does not exist yet
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    async def _stop(self) -> None:
        self._commands.put(_Stop())
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)

    async def _prepare(self, request_id: str, prompt: str | list[int], params: Any) -> Any:
        return prompt, params  # the engine tokenizes and checks on its own thread

    def _submit_add(self, request_id: str, prepared: Any, done: asyncio.Future[None]) -> None:
        self._commands.put(_Add(request_id, *prepared, done))

    def _submit_abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    # --- engine thread -------------------------------------------------------------------
    def _apply(self, command: _Add | _Abort | _Stop) -> bool:
        """Runs one command on the engine thread; False means stop."""
        if isinstance(command, _Stop):
            for request_id in self._in_engine:
                self.engine.abort_request(request_id)
            self._in_engine.clear()
            self._fail_streams(EngineStoppedError)
            return False
        if isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)
            self._in_engine.discard(command.request_id)
            return True
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params)
        except Exception as exc:  # InvalidParameterError and friends go back to the caller
            self._resolve(command.done, exc)
        else:
            self._in_engine.add(command.request_id)
            self._resolve(command.done, None)
        return True

    def _drain(self, block: bool) -> tuple[bool, int]:
        """Applies queued commands; returns (keep running, number of adds applied)."""
        adds = 0
        try:
            command = self._commands.get(timeout=_IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return True, 0
        while True:
            adds += isinstance(command, _Add)
            if not self._apply(command):
                return False, adds
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True, adds

    def _run(self) -> None:
        try:
            while True:
                running, adds = self._drain(block=not self.engine.has_unfinished_requests())
                outputs = self.engine.step() if running and self.engine.has_unfinished_requests() else []
                self._in_engine.difference_update(o.request_id for o in outputs if o.finished)
                # Stats first: a client that sees its request finish then sees it in the stats too.
                self._stats = self.engine.get_stats()
                self._dispatch(outputs, time.monotonic())
                self._pending.settled(adds)
                if not running:
                    return
        except BaseException as exc:  # the loop is dead: fail every request, /health turns 503
            self._dead = True
            logger.exception("engine loop died")
            self._fail_streams(EngineDeadError)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._fail_queued_adds()

    def _fail_queued_adds(self) -> None:
        """Adds still queued when the thread exits will never run: tell their callers."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                self._resolve(command.done, EngineDeadError() if self._dead else EngineStoppedError())


class RequestStream:
    """One admitted request. Iterate `outputs()`; `close()` (or leaving the iteration early)
    aborts it in the engine unless it already finished. Closing twice is harmless."""

    def __init__(self, owner: EngineLoopBase, request_id: str, stream: _Stream):
        self._owner = owner
        self.request_id = request_id
        self._stream = stream
        self.finished = False
        self._closed = False

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Yields the cumulative output each time the request progresses, until finished."""
        try:
            while not self.finished:
                items = [await self._stream.queue.get()]
                while not self._stream.queue.empty():
                    items.append(self._stream.queue.get_nowait())
                output = _coalesce(items)
                self.finished = output.finished
                yield output
        finally:
            self.close()

    async def final(self) -> RequestOutput:
        last: RequestOutput | None = None
        async for output in self.outputs():
            last = output
        assert last is not None
        return last

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner._release(self.request_id, abort=not self.finished)


def _coalesce(items: list[RequestOutput | BaseException]) -> RequestOutput:
    """Outputs are cumulative, so a consumer that fell behind only needs the newest one per
    sample index. Errors win."""
    for item in items:
        if isinstance(item, BaseException):
            raise item
    outputs: list[RequestOutput] = items  # type: ignore[assignment]
    if len(outputs) == 1:
        return outputs[0]
    latest = outputs[-1]
    by_index = {completion.index: completion for item in outputs for completion in item.outputs}
    if len(by_index) == len(latest.outputs):
        return latest
    # Every other field (metrics included) is the newest output's.
    return dataclasses.replace(latest, outputs=[by_index[i] for i in sorted(by_index)])
