"""Progress of an engine start-up or a compile: the phases it logs, and on a terminal a rich
display while they run.

The engine reports its phases through `on_progress` (this logs them); passes and the backend log
to "compiled_serve.passes". Printing is the logging setup's job (compiled_serve.logging_setup), so
every line is printed once. This display keeps a timed copy of each line (`lines`, what a build's
log records) and, on a terminal, shows the latest one beside a spinner, and a bar with its count
for each phase that reports a known total (compiled_serve.phase_progress):

    ⠋ compiling (warm-up steps)                                  0:00:41
      loading weights            ━━━━━━━━━━━━━━━━━━━━━━ 272/272  0:00:20
      warm-up steps              ━━━━━━━━━━━━╺━━━━━━━━━━━   3/6  0:00:21

The display is transient (gone once the engine is ready) and writes nothing off a terminal,
where the log's one line per phase, with its elapsed time, is the whole record.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import Any

from compiled_serve.logging_setup import ensure_library_logging
from compiled_serve.phase_progress import reporting_progress

logger = logging.getLogger("compiled_serve.engine")


class _Record(logging.Handler):
    def __init__(self, progress: CompileProgress):
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.record(record.getMessage())


def _columns() -> list[Any]:
    """Spinner, text, and for a phase with a total (not the status line) its bar and count."""
    from rich.progress import BarColumn, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Bar(BarColumn):
        def render(self, task: Any) -> Any:
            return Text("") if task.total is None else super().render(task)

    class Count(ProgressColumn):
        def render(self, task: Any) -> Any:
            return Text("" if task.total is None else f"{int(task.completed)}/{int(task.total)}",
                        style="progress.download", justify="right")

    return [SpinnerColumn(), TextColumn("{task.description}"), Bar(), Count(), TimeElapsedColumn()]


class CompileProgress:
    """A transient rich display plus a timed log of what the start-up did (`lines`).

    `console`: where the display draws (rich's default: stdout); `enabled=False`: no display."""

    def __init__(self, enabled: bool = True, console: Any = None):
        self.enabled = enabled
        self.console = console
        self.lines: list[str] = []
        self._start = time.perf_counter()
        self._handler = _Record(self)
        self._loggers = [logging.getLogger(name) for name in ("compiled_serve.passes", "compiled_serve.models")]
        self._old_levels = [log.level for log in self._loggers]
        self._progress: Any = None
        self._task: Any = None
        self._bars: dict[str, Any] = {}  # phase -> its task in the display
        self._reporting: Any = None

    def __enter__(self) -> CompileProgress:
        ensure_library_logging()
        self._start = time.perf_counter()
        for log in self._loggers:
            log.addHandler(self._handler)
            if log.getEffectiveLevel() > logging.INFO:
                log.setLevel(logging.INFO)
        if self.enabled:
            from rich.progress import Progress

            self._progress = Progress(*_columns(), console=self.console, transient=True)
            self._task = self._progress.add_task("loading model", total=None)
            self._progress.start()
            self._reporting = reporting_progress(self.advance)
            self._reporting.__enter__()
        return self

    def update(self, message: str) -> None:
        """A phase the engine reports (`LLMEngine(on_progress=...)`): logged, and recorded."""
        logger.info(message)
        self.record(message)

    def record(self, message: str) -> None:
        self.lines.append(f"[{time.perf_counter() - self._start:7.2f}s] {message}")
        if self._progress is not None:
            self._progress.update(self._task, description=message)

    def advance(self, phase: str, done: int, total: int) -> None:
        """`done` of `total` steps of `phase` (compiled_serve.phase_progress): its bar, on a terminal.
        Logs nothing: the phase logs its own summary line when it ends."""
        if self._progress is None:
            return
        task = self._bars.get(phase)
        if task is None:
            task = self._bars[phase] = self._progress.add_task(f"  {phase}", total=total)
        self._progress.update(task, completed=done, total=total)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._reporting is not None:
            self._reporting.__exit__(None, None, None)
            self._reporting = None
        for log, level in zip(self._loggers, self._old_levels):
            log.removeHandler(self._handler)
            log.setLevel(level)
        if self._progress is not None:
            self._progress.stop()
