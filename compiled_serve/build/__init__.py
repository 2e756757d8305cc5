"""Persisted compiled builds: the build key of an engine, loading a build at start-up, and the
`compiled-serve compile` command that produces builds (see `compiled_serve.build.compile`)."""

from __future__ import annotations

from compiled_serve.build.key import engine_build_key
from compiled_serve.build.loading import BuildRefusedError, BuildStatus, load_build

__all__ = ["BuildRefusedError", "BuildStatus", "engine_build_key", "load_build"]
