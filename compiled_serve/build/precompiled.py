"""AOT-compiled step and logits-tail functions kept in the build, so a warm start skips dynamo.

Profiling a warm start on the 2-core CPU (docs/perf-notes.md, issue 11): with the build's Inductor
cache installed, dynamo still traced the model step and the four logits-tail variants again (12 of
17 s), and AOTAutograd still traced the step before its FX-graph cache hit. A build that holds the
traced and compiled functions themselves skips all of it.

On a cold start (`Precompiled(..., recording=True)`), the first call of each variant AOT-compiles
it (`torch.compile(...).aot_compile`, the same dynamo capture, passes and backend the plain call
would run), and `artifacts()` serialises every variant for the build:

    precompiled.json              {"context": ..., "functions": {name: [{"none": [...], "artifact": ...}]}}
    precompiled-<name>-<i>.bin    torch's serialised AOT function (guards, bytecode, compiled graph)

On a warm start (`Precompiled.load`), those variants are deserialised before the first step.
torch cannot check a loaded function's guards here (a guard on a module global of the forward
context fails after a load), so a loaded function runs with its guards off and this class is
the dispatch instead: a variant is chosen by which optional arguments are None, the only thing
that tells the engine's calls apart (the token and row dimensions are dynamic, the dtypes and the
KV-cache geometry fixed: the build key and `context` cover them). A variant whose guards rejected
a call on the cold start is not stored, so the warm start traces it again. A call that matches no
stored variant runs the plain `torch.compile`d function (dynamo traces it): the warm-up runs every
variant serving reaches, so that happens before ready, never after.

Only where the engine runs the step in-process on the CPU (CUDA graphs and tensor-parallel
workers keep the plain path), and for a quantized model only the logits tail (its step's weights
are graph constants a loaded function lacks).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

logger = logging.getLogger("compiled_serve.build")

INDEX_ARTIFACT = "precompiled.json"
_FORMAT = 1


def variant_key(args: tuple[Any, ...]) -> tuple[bool, ...]:
    """Which positional arguments are None: what tells the engine's calls of one function apart."""
    return tuple(a is None for a in args)


class PrecompiledFunction:
    """A `torch.compile(fullgraph=True)` function called through its AOT-compiled variants."""

    def __init__(self, name: str, compiled: Any, f_globals: dict[str, Any], external: Mapping[str, Any] | None = None,
                 compile_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 recording: bool = True):
        self.name = name
        self.compiled = compiled  # the torch.compile'd callable (has .aot_compile)
        self.f_globals = f_globals
        self.external = dict(external or {})
        self.compile_context = compile_context or contextlib.nullcontext
        self.recording = recording
        self.variants: dict[tuple[bool, ...], Any] = {}
        self.loaded: set[tuple[bool, ...]] = set()
        self.rejected: set[tuple[bool, ...]] = set()  # guards refused a call: traced by dynamo, never stored
        self.num_compiled = 0  # variants AOT-compiled in this process
        self.num_fallback_calls = 0  # calls that went to the plain torch.compile'd function

    def __call__(self, *args: Any) -> Any:
        key = variant_key(args)
        fn = self.variants.get(key)
        if fn is not None:
            if key in self.loaded or fn.guard_check(*args):
                return fn.fn(*args)
            logger.warning("precompiled %s variant %s: guards refused a call; tracing it with dynamo instead "
                           "(not stored in the build)", self.name, _describe(key))
            del self.variants[key]
            self.rejected.add(key)
        elif self.recording and key not in self.rejected:
            from compiled_serve.passes.pipeline import whole_graph_compile

            with self.compile_context(), whole_graph_compile():  # one serialisable graph, no regions
                fn = self.compiled.aot_compile((args, {}))
            self.variants[key] = fn
            self.num_compiled += 1
            return fn.fn(*args)  # its guards hold for the inputs it was traced from
        self.num_fallback_calls += 1
        with self.compile_context():
            return self.compiled(*args)

    def serialize(self) -> list[tuple[tuple[bool, ...], bytes]]:
        from torch._dynamo.aot_compile import AOTCompiledFunction

        return [(key, AOTCompiledFunction.serialize(fn, self.external).serialized_data)
                for key, fn in sorted(self.variants.items()) if key not in self.loaded]

    def load_variant(self, key: tuple[bool, ...], data: bytes) -> None:
        fn = _unguarded_class().deserialize(data, self.f_globals, self.external)
        fn.disable_guard_check()
        self.variants[key] = fn
        self.loaded.add(key)


@functools.lru_cache(maxsize=1)
def _unguarded_class() -> type:
    """torch's AOTCompiledFunction without rebuilding its guard manager on load (about 0.2 s of
    CPU per function here): a loaded function runs with its guards off anyway (module docstring).
    The system check (torch version, device) still runs."""
    from torch._dynamo.aot_compile import AOTCompiledFunction

    class UnguardedAOTCompiledFunction(AOTCompiledFunction):
        def __post_init__(self) -> None:
            self._artifacts.check_compatibility()
            self.fn = self._artifacts.runtime_env.forward_callable(
                self._artifacts.backend_id, self._artifacts.compiled_fn, extra_globals=self._extra_globals)

        def guard_check(self, *args: Any, **kwargs: Any) -> bool:
            raise RuntimeError("a loaded precompiled function has no guards to check")

    return UnguardedAOTCompiledFunction


class Precompiled:
    """The engine's precompiled functions ("step", "tail"), their build artifacts, and their load."""

    def __init__(self, context: str, recording: bool = True):
        self.context = context  # what the functions were compiled against beyond the build key
        self.recording = recording
        self.functions: dict[str, PrecompiledFunction] = {}
        self.load_seconds = 0.0
        self._stored: dict[str, list[tuple[tuple[bool, ...], bytes]]] = {}
        self._expected: dict[str, int] = {}  # variants per function in the loaded build

    def wrap(self, name: str, compiled: Any, f_globals: dict[str, Any], external: Mapping[str, Any] | None = None,
             compile_context: Callable[[], contextlib.AbstractContextManager] | None = None) -> PrecompiledFunction:
        fn = PrecompiledFunction(name, compiled, f_globals, external, compile_context, self.recording)
        self.functions[name] = fn
        start = time.perf_counter()
        for key, data in self._stored.pop(name, []):
            try:
                fn.load_variant(key, data)
            except Exception as exc:  # noqa: BLE001  (a build we cannot load is traced again, never fatal)
                logger.warning("could not load precompiled %s variant %s (%s): tracing it with dynamo",
                               name, _describe(key), exc)
        self.load_seconds += time.perf_counter() - start
        return fn

    @property
    def complete(self) -> bool:
        """Every function has variants from the build, and every stored variant loaded: the warm
        start holds what the cold start's full warm-up compiled, so nothing is left to compile."""
        return (not self.recording and set(self._expected) == set(self.functions) and not self._stored
                and all(n > 0 and len(self.functions[name].loaded) == n for name, n in self._expected.items()))

    @property
    def num_loaded(self) -> int:
        return sum(len(f.loaded) for f in self.functions.values())

    @property
    def num_compiled(self) -> int:
        return sum(f.num_compiled for f in self.functions.values())

    def artifacts(self) -> dict[str, bytes]:
        """The build artifacts of every variant compiled in this process (none after a full load)."""
        from compiled_serve.cache.build_key import canonical_json

        index: dict[str, Any] = {"format": _FORMAT, "context": self.context, "functions": {}}
        out: dict[str, bytes] = {}
        for name, fn in self.functions.items():
            entries = []
            for i, (key, data) in enumerate(fn.serialize()):
                artifact = f"precompiled-{name}-{i}.bin"
                out[artifact] = data
                entries.append({"none": list(key), "artifact": artifact})
            index["functions"][name] = entries
        if not out:
            return {}
        out[INDEX_ARTIFACT] = canonical_json(index)
        return out

    @classmethod
    def from_build(cls, artifacts: Mapping[str, bytes] | None, context: str) -> Precompiled:
        """The functions of a loaded build, deserialised when `wrap` names them; a build without
        them, or compiled against another context, records afresh (and says why)."""
        if not artifacts or INDEX_ARTIFACT not in artifacts:
            return cls(context)
        start = time.perf_counter()
        try:
            index = json.loads(artifacts[INDEX_ARTIFACT])
            if index.get("format") != _FORMAT:
                raise ValueError(f"format {index.get('format')} (this code reads {_FORMAT})")
            if index.get("context") != context:
                logger.info("precompiled functions of the build were compiled for %s, not %s: tracing again",
                            index.get("context"), context)
                return cls(context)
            stored = {name: [(tuple(bool(b) for b in e["none"]), artifacts[e["artifact"]]) for e in entries]
                      for name, entries in index["functions"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("precompiled functions of the build are unreadable (%s): tracing again", exc)
            return cls(context)
        pre = cls(context, recording=False)
        pre._stored = stored
        pre._expected = {name: len(entries) for name, entries in stored.items()}
        pre.load_seconds = time.perf_counter() - start
        return pre


def _describe(key: tuple[bool, ...]) -> str:
    return "(" + ", ".join("None" if none else "tensor" for none in key) + ")"


def kv_context(kv_caches: list[Any]) -> str:
    """The KV-cache geometry the step is compiled against (its size is not in the build key)."""
    first = kv_caches[0]
    return f"kv {len(kv_caches)} x {list(first.shape)} {str(first.dtype).removeprefix('torch.')}"


_recording = 0  # > 0 inside `recording_precompiled()`: a build will be stored from this start


@contextlib.contextmanager
def recording_precompiled() -> Iterator[None]:
    """Engines started inside this block AOT-compile their functions for the build being made
    (`compile`, or a start whose build the cache will store). Outside it, a cold engine compiles
    the plain way: an AOT compile bypasses Inductor's caches, so with nothing to store it would
    only be slower."""
    global _recording
    _recording += 1
    try:
        yield
    finally:
        _recording -= 1


def engine_precompiled(engine: Any, step_fn: Any) -> tuple[Precompiled | None, Any, Any]:
    """(precompiled, step, tail) for an in-process CPU engine: its compiled step and logits tail
    wrapped so their variants come from the loaded build, or are AOT-compiled for the build being
    recorded; (None, step, tail) unchanged when there is neither (a build without usable
    functions, or nothing to store)."""
    from compiled_serve.passes.logits_tail_pipeline import size_oblivious

    status = engine.build_status
    context = kv_context(engine.kv_caches)
    if status is not None and status.loaded:
        pre = Precompiled.from_build(status.artifacts, context)
        if pre.recording:  # nothing usable in the build, and a loaded build is not stored again
            return None, step_fn, engine.logits_tail
    elif _recording:
        pre = Precompiled(context)
    else:
        return None, step_fn, engine.logits_tail
    # A quantized model's step stays on the plain path (dynamo, then Inductor's FX-graph cache from
    # the build): its int4/int8 weights are constants the pass adds to the graph, and a loaded AOT
    # function does not carry them (Inductor's loaded step asked for 16 more inputs than it got).
    quantized = getattr(engine, "quantization", "none") not in (None, "none")
    step = step_fn if quantized else pre.wrap("step", step_fn, _globals_of(step_fn), external={"model": engine.model})
    tail_compiled = engine.logits_tail.compiled
    tail = pre.wrap("tail", tail_compiled, _globals_of(tail_compiled), compile_context=size_oblivious)
    if pre.num_loaded:
        logger.info("loaded %d precompiled function(s) from the build in %.2fs (no dynamo trace)", pre.num_loaded,
                    pre.load_seconds)
    return pre, step, tail


def _globals_of(compiled: Any) -> dict[str, Any]:
    """The globals of the function a `torch.compile` wrapper traces (what its bytecode reads)."""
    return getattr(compiled, "_torchdynamo_orig_callable", compiled).__globals__


def with_precompiled(engine: Any, artifacts: dict[str, bytes]) -> dict[str, bytes]:
    """A build's artifacts with the engine's AOT-compiled functions added. When the engine
    AOT-compiled them, torch's recorded compile cache is left out: all it holds then is the
    AOT-autograd bundle of those functions, under a key no later lookup computes (an AOT compile
    bypasses the cache key), and different on every compile, so a build would never reproduce."""
    pre = engine.precompiled
    if pre is None or not pre.num_compiled:
        return artifacts
    from compiled_serve.cache.inductor_artifacts import INDUCTOR_CACHE_ARTIFACT, INDUCTOR_CACHE_INDEX

    out = {k: v for k, v in artifacts.items() if k not in (INDUCTOR_CACHE_ARTIFACT, INDUCTOR_CACHE_INDEX)}
    out.update(pre.artifacts())
    return out
