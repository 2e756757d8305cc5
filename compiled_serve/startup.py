"""Starting an engine with its phases on the log: what `serve`, `chat` and the offline `LLM` share.

    ... INFO compiled_serve.models: loading weights: /path/model.gguf (gguf format, float32 on cpu)
    ... INFO compiled_serve.models: loaded weights in 21.3s: 134.5M parameters, 513 MiB
    ... INFO compiled_serve.engine: compiling (warm-up steps)
    ... INFO compiled_serve.passes: passes on graph 0: {...} in 0.030s
    ... INFO compiled_serve.passes: compiled graph 0 (inductor) in 31.20s
    ... INFO compiled_serve.engine: engine ready in 58.1s: load 21.9s, compile and warm-up 36.0s (...)

The ready line's figures are the engine's own (`load_seconds`, `compile_seconds`), the ones its
startup report shows.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING

from compiled_serve.build.progress import CompileProgress
from compiled_serve.config import EngineConfig

if TYPE_CHECKING:
    from compiled_serve.engine.llm_engine import LLMEngine

logger = logging.getLogger("compiled_serve.engine")


def on_a_terminal() -> bool:
    """A spinner only where a person watches (the spinner is on stdout, the log on stderr)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def start_engine(config: EngineConfig, spinner: bool | None = None) -> LLMEngine:
    """Builds the engine, logging each phase; `spinner` None: on a terminal only."""
    from compiled_serve.engine.llm_engine import LLMEngine

    start = time.perf_counter()
    with CompileProgress(enabled=on_a_terminal() if spinner is None else spinner) as progress:
        engine = LLMEngine(config, on_progress=progress.update)
    logger.info(ready_line(engine, time.perf_counter() - start))
    return engine


def ready_line(engine: LLMEngine, total_seconds: float) -> str:
    graphs = engine.compile_report.graphs
    backend = sum(graph["seconds"] for graph in graphs)
    return (f"engine ready in {total_seconds:.1f}s: load {engine.load_seconds:.1f}s, compile and warm-up "
            f"{engine.compile_seconds:.1f}s ({len(graphs)} model graph(s), passes and "
            f"{engine.config.compile_mode} backend {backend:.1f}s of it; the rest is dynamo capture and "
            "warm-up steps)")
