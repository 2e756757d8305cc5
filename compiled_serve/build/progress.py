"""Progress of an engine start-up or a compile: the phases it logs, and a rich spinner while they run.

The engine reports its phases through `on_progress` (this logs them); passes and the backend log
to "compiled_serve.passes". Printing is the logging setup's job (compiled_serve.logging_setup), so
every line is printed once. This display keeps a timed copy of each line (`lines`, what a build's
log records) and shows the latest one beside a spinner on a terminal.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import Any

from compiled_serve.logging_setup import ensure_library_logging

logger = logging.getLogger("compiled_serve.engine")


class _Record(logging.Handler):
    def __init__(self, progress: CompileProgress):
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.record(record.getMessage())


class CompileProgress:
    """A transient rich status line plus a timed log of what the start-up did (`lines`)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.lines: list[str] = []
        self._start = time.perf_counter()
        self._handler = _Record(self)
        self._loggers = [logging.getLogger(name) for name in ("compiled_serve.passes", "compiled_serve.models")]
        self._old_levels = [log.level for log in self._loggers]
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> CompileProgress:
        ensure_library_logging()
        self._start = time.perf_counter()
        for log in self._loggers:
            log.addHandler(self._handler)
            if log.getEffectiveLevel() > logging.INFO:
                log.setLevel(logging.INFO)
        if self.enabled:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                      transient=True)
            self._task = self._progress.add_task("loading model", total=None)
            self._progress.start()
        return self

    def update(self, message: str) -> None:
        """A phase the engine reports (`LLMEngine(on_progress=...)`): logged, and recorded."""
        logger.info(message)
        self.record(message)

    def record(self, message: str) -> None:
        self.lines.append(f"[{time.perf_counter() - self._start:7.2f}s] {message}")
        if self._progress is not None:
            self._progress.update(self._task, description=message)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for log, level in zip(self._loggers, self._old_levels):
            log.removeHandler(self._handler)
            log.setLevel(level)
        if self._progress is not None:
            self._progress.stop()
