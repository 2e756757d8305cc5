"""Make torch's compile-cache blob a function of the compile's inputs, not of when it ran.

torch writes a few run-dependent values into its cache entries: compile durations
(`CompiledFxGraph._time_taken_ns`, `AOTAutogradResult.forward_time_taken_ns`, ...) and debug text
(a repro script and cache-key explanations holding object addresses and an unordered config dump).
None of them changes what the entry does. `normalize_cache_blob` rewrites those fields to fixed
values and re-serializes the blob, so that two compiles of the same inputs in fresh processes
produce the same bytes and so the same manifest hash (process-local counters such as AOT ids
start from zero in every fresh process, which is why `compile` runs once per process).

Trust: this unpickles entries, so it only ever runs on a blob this process just produced
(`capture_inductor_artifacts`), never on bytes read from disk.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

logger = logging.getLogger("compiled_serve.build")

_TIME_FIELDS = ("_time_taken_ns", "forward_time_taken_ns", "backward_time_taken_ns")


def _normalize_entry(obj: Any) -> Any:
    state = getattr(obj, "__dict__", None)
    if state is None:
        return obj
    for name in _TIME_FIELDS:
        if isinstance(state.get(name), int):
            state[name] = 0
    # Debug-only text (a repro script, cache-key explanations) that embeds object addresses and
    # an unordered config dump; never executed when the entry is loaded.
    if isinstance(state.get("runnable_graph_str"), str):
        state["runnable_graph_str"] = ""
    if isinstance(state.get("_fx_graph_cache_debug_lines"), list):
        state["_fx_graph_cache_debug_lines"] = []
    # AOT entries keep the same debug lines nested: compiled_fw.fx_graph_cache_info = (key, lines).
    info = state.get("fx_graph_cache_info")
    if isinstance(info, tuple) and len(info) == 2 and isinstance(info[1], list):
        state["fx_graph_cache_info"] = (info[0], [])
    for name in ("compiled_fw", "compiled_bw"):
        if state.get(name) is not None:
            _normalize_entry(state[name])
    return obj


def normalize_cache_blob(blob: bytes) -> bytes:
    """The same blob with run-dependent fields fixed; the input unchanged if torch's format is unknown."""
    try:
        from torch.compiler._cache import (
            CacheArtifactFactory,
            CacheArtifactManager,
            _serialize_single_cache,
        )
        from torch.utils._appending_byte_serializer import AppendingByteSerializer

        result = CacheArtifactManager.deserialize(blob)
        if result is None:
            return blob
        normalized = {}
        for kind, artifacts in result.items():
            out = []
            for artifact in artifacts:
                content = artifact.content
                try:
                    content = pickle.dumps(_normalize_entry(pickle.loads(content)))
                except Exception:  # not a pickle we understand: keep it as recorded
                    pass
                out.append(CacheArtifactFactory.create(kind, artifact.key, content))
            normalized[kind] = out
        serializer = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
        serializer.extend(normalized.items())
        return serializer.to_bytes()
    except (ImportError, AttributeError, TypeError) as exc:
        logger.warning("cannot normalize torch's cache blob (%s); the build will not be bit-reproducible", exc)
        return blob
