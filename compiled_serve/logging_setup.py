"""One log format for the CLI and the offline `LLM`: a timestamp on every line, each line once.

    2025-01-31 12:00:03.412 INFO compiled_serve.models: loaded weights in 21.3s: 134.5M parameters, 513 MiB

The CLI owns the process, so `configure_logging` puts one handler on the root logger (uvicorn's
loggers and every library propagate to it). A library must not do that, so `LLM()` calls
`ensure_library_logging`: a handler on the "compiled_serve" logger that writes only while the
application has configured no logging of its own; once it has, the application's handlers print
our records and ours stays silent, so no line appears twice.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
PACKAGE_LOGGER = "compiled_serve"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time: rich's live progress display swaps in a
    proxy while it runs, so a log line lands above the spinner instead of through it."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


class _RootHandler(_CurrentStderr):
    pass


class _FallbackHandler(_CurrentStderr):
    """Emits only while the root logger has no handler (the application configured nothing)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def configure_logging(level: str | int = "info") -> None:
    """The CLI's logging: one timestamped stderr handler on the root logger, at `level`.
    Calling it again replaces the handler rather than adding a second one."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _RootHandler)]:
        root.removeHandler(handler)
    level = level.upper() if isinstance(level, str) else level
    handler = _RootHandler()
    # On the handler too: a logger below root set to INFO (a progress display listening to it)
    # would otherwise reach stderr through root whatever root's own level.
    handler.setLevel(level)
    root.addHandler(handler)
    root.setLevel(level)


def ensure_library_logging() -> None:
    """The offline API's logging: compiled_serve's INFO lines on stderr unless the application set
    up logging itself. Idempotent."""
    package = logging.getLogger(PACKAGE_LOGGER)
    if any(isinstance(h, _FallbackHandler) for h in package.handlers):
        return
    if logging.getLogger().handlers:
        return  # the application configured logging: its handlers and levels decide
    package.addHandler(_FallbackHandler())
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)
