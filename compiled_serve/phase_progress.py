"""How far a long start-up phase has got, reported from any layer to whoever displays it.

    report_progress("loading weights", done=12, total=272)

A phase whose total is known up front (tensors to load, warm-up steps to run, CUDA graphs to
capture) reports each step here; nothing is logged. The start-up's display
(compiled_serve.build.progress.CompileProgress) listens through `reporting_progress` and draws a
bar on a terminal; off a terminal nobody listens and the phase's own one-line summary ("loaded
weights in 21.3s: ...") is the log. It imports nothing of the package, so models/ and kernels/
may report too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

# (phase, done, total): `done` of `total` steps of `phase` are finished.
ProgressListener = Callable[[str, int, int], None]

_listener: ContextVar[ProgressListener | None] = ContextVar("compiled_serve_progress", default=None)


def report_progress(phase: str, done: int, total: int) -> None:
    """`done` of `total` steps of `phase` are finished; a no-op unless someone listens."""
    listener = _listener.get()
    if listener is not None:
        listener(phase, done, total)


@contextlib.contextmanager
def reporting_progress(listener: ProgressListener) -> Iterator[None]:
    """Sends this thread's (this context's) progress reports to `listener` while the block runs."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)
