"""Progress of a compile: one line per pass run, graph compiled and bucket captured, with times.

The engine reports its phases through `on_progress`; passes and the backend report through the
"compiled_serve.passes" logger, which this display listens to while it is open.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import Any


class _Forward(logging.Handler):
    def __init__(self, progress: CompileProgress):
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.update(record.getMessage())


class CompileProgress:
    """A rich status line plus a timestamped log of what the compile did (`lines`)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.lines: list[str] = []
        self._start = time.perf_counter()
        self._handler = _Forward(self)
        self._logger = logging.getLogger("compiled_serve.passes")
        self._old_level = self._logger.level
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> CompileProgress:
        self._start = time.perf_counter()
        self._logger.addHandler(self._handler)
        if self._logger.getEffectiveLevel() > logging.INFO:
            self._logger.setLevel(logging.INFO)
        if self.enabled:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                      transient=True)
            self._task = self._progress.add_task("loading model", total=None)
            self._progress.start()
        return self

    def update(self, message: str) -> None:
        line = f"[{time.perf_counter() - self._start:7.2f}s] {message}"
        self.lines.append(line)
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False)
            self._progress.update(self._task, description=message)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._old_level)
        if self._progress is not None:
            self._progress.stop()
