"""Starting an engine with its phases on the log: what `serve`, `chat` and the offline `LLM` share.

    ... INFO compiled_serve.models: loading weights: /path/model.gguf (gguf format, float32 on cpu)
    ... INFO compiled_serve.models: loaded weights in 21.3s: 134.5M parameters, 513 MiB
    ... INFO compiled_serve.build: build cache: no build 3f2a... in ~/.cache/compiled_serve yet; compiling
    ... INFO compiled_serve.engine: compiling (warm-up steps)
    ... INFO compiled_serve.passes: passes on graph 0: {...} in 0.030s
    ... INFO compiled_serve.passes: compiled graph 0 (inductor) in 31.20s
    ... INFO compiled_serve.engine: warm-up done in 58.1s: dynamo capture 9.0s, passes and inductor 31.2s, ...
    ... INFO compiled_serve.build: build 3f2a... stored in the build cache in 0.4s (0.52 GiB of 4.00 GiB ...)
    ... INFO compiled_serve.engine: engine ready in 80.1s: load 21.9s, compile and warm-up 58.1s (...)

The figures of the warm-up and ready lines are the engine's own (`load_seconds`, `compile_seconds`,
`compile_report`), the ones its startup report shows, plus dynamo's own compile timers.

The build cache (compiled_serve.cache.build_cache): unless `EngineConfig.build_cache` is off or a
`build_dir` is named, the engine looks its build up in the cache before compiling; after a miss,
what torch recorded while compiling is stored there for the next start.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from compiled_serve.build.progress import CompileProgress
from compiled_serve.cache.build_cache import BuildCache
from compiled_serve.config import EngineConfig

if TYPE_CHECKING:
    from compiled_serve.engine.llm_engine import LLMEngine

logger = logging.getLogger("compiled_serve.engine")
build_logger = logging.getLogger("compiled_serve.build")


def on_a_terminal() -> bool:
    """A spinner only where a person watches (the spinner is on stdout, the log on stderr)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def build_cache_for(config: EngineConfig) -> BuildCache | None:
    """The build cache this config uses: none with a build_dir or with build_cache off."""
    if config.build_dir is not None or not config.build_cache:
        return None
    return BuildCache(max_bytes=int(config.build_cache_gib * 2**30))


def start_engine(config: EngineConfig, spinner: bool | None = None, console: Any = None) -> LLMEngine:
    """Builds the engine, logging each phase; `spinner` (the progress display) None: on a terminal
    only; `console`: the rich console it draws on (None: stdout)."""
    from compiled_serve.engine.llm_engine import LLMEngine

    start = time.perf_counter()
    cache = build_cache_for(config)
    dynamo_before, inductor_before = _dynamo_seconds(), _inductor_counts()
    with CompileProgress(enabled=on_a_terminal() if spinner is None else spinner, console=console) as progress, \
            _recording(cache):
        engine = LLMEngine(config, on_progress=progress.update, build_cache=cache)
        backends = sum(g["seconds"] for report in (engine.compile_report, engine.tail_report) for g in report.graphs)
        dynamo = max(0.0, _dynamo_seconds() - dynamo_before - backends)
        hits, misses = (after - before for after, before in zip(_inductor_counts(), inductor_before))
        if engine.precompiled is not None and engine.precompiled.num_compiled and hits + misses == 0:
            misses = engine.compile_report.num_graphs  # an AOT compile generates without consulting the FX cache
        logger.info(warmup_line(engine, dynamo, hits, misses))
        status = engine.build_status
        if status is not None and config.compile_mode == "inductor":
            status.message += f"; Inductor: {hits} graph(s) from cache, {misses} generated"
        if cache is not None and status is not None:
            if status.loaded:
                status.message += f"; cache {cache.describe()}"
            else:
                _store_build(engine, cache)
    logger.info(ready_line(engine, time.perf_counter() - start))
    return engine


@contextlib.contextmanager
def _recording(cache: BuildCache | None) -> Iterator[None]:
    """Record torch's compile artifacts while the engine starts, when the cache wants them."""
    if cache is None:
        yield
        return
    from compiled_serve.build.precompiled import recording_precompiled
    from compiled_serve.cache.inductor_artifacts import recording_compile_artifacts

    with recording_compile_artifacts(), recording_precompiled():
        yield


def _store_build(engine: LLMEngine, cache: BuildCache) -> None:
    from compiled_serve.build.compile import PASS_REPORT_ARTIFACT, pass_report
    from compiled_serve.build.precompiled import with_precompiled
    from compiled_serve.cache.build_key import canonical_json
    from compiled_serve.cache.inductor_artifacts import capture_inductor_artifacts

    start = time.perf_counter()
    status = engine.build_status
    assert status is not None
    try:
        artifacts = with_precompiled(engine, capture_inductor_artifacts())
        artifacts[PASS_REPORT_ARTIFACT] = canonical_json(pass_report(engine.compile_report, engine.tail_report))
        cache.save(engine.build_key, artifacts, report={"model": engine.model_source,
                                                        "compile_seconds": round(engine.compile_seconds, 2)})
    except Exception as exc:  # the cache must never stop a start
        build_logger.warning("could not store the build in the build cache: %s", exc)
        status.message = f"cache miss: compiled; not stored ({exc})"
        return
    size = cache.describe()
    build_logger.info("build %s stored in the build cache in %.1fs (%s)", engine.build_key.digest()[:12],
                      time.perf_counter() - start, size)
    status.message += f"; cache {size}"


def _inductor_counts() -> tuple[int, int]:
    """Inductor's FX-graph cache (hits, misses) so far in this process: a miss is a graph whose code
    Inductor generated, a hit one it loaded."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def _dynamo_seconds() -> float:
    """Dynamo's whole compile time so far in this process (its plain compiles and its AOT
    captures, backends included), from dynamo's own timers (private API: zero where missing)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return 0.0
    return sum(sum(compilation_time_metrics.get(key, [])) for key in ("_compile.compile_inner", "fullgraph_capture"))


def warmup_line(engine: LLMEngine, dynamo_seconds: float, hits: int = 0, misses: int = 0) -> str:
    backend = sum(graph["seconds"] for graph in engine.compile_report.graphs)
    rest = max(0.0, engine.compile_seconds - backend - dynamo_seconds)
    generated = f"; Inductor: {hits} from cache, {misses} generated" if engine.config.compile_mode == "inductor" \
        else ""
    pre = getattr(engine, "precompiled", None)
    if pre is not None and pre.num_loaded:
        loaded = f"{pre.num_loaded} precompiled function(s) loaded from the build in {pre.load_seconds:.1f}s, "
        return (f"warm-up done in {engine.compile_seconds:.1f}s: {loaded}dynamo {dynamo_seconds:.1f}s "
                f"({len(engine.compile_report.graphs) + len(engine.tail_report.graphs)} graph(s) traced), "
                f"warm-up steps {max(0.0, engine.compile_seconds - pre.load_seconds - dynamo_seconds):.1f}s")
    return (f"warm-up done in {engine.compile_seconds:.1f}s: dynamo capture {dynamo_seconds:.1f}s, passes and "
            f"{engine.config.compile_mode} backend {backend:.1f}s ({len(engine.compile_report.graphs)} model "
            f"graph(s){generated}), warm-up steps and tail graphs {rest:.1f}s")


def ready_line(engine: LLMEngine, total_seconds: float) -> str:
    build = engine.build_status.message if engine.build_status is not None else "no build cache"
    return (f"engine ready in {total_seconds:.1f}s: load {engine.load_seconds:.1f}s, compile and warm-up "
            f"{engine.compile_seconds:.1f}s; build: {build}")
