"""Persisted compiled builds: loading a build at start-up, and the `compiled-serve compile`
command that produces builds (see `compiled_serve.build.compile`). The build key and the store
live one layer down, in `compiled_serve.cache`."""

from __future__ import annotations

from compiled_serve.build.loading import BuildMismatchError, BuildRefusedError, BuildStatus, load_build

__all__ = ["BuildMismatchError", "BuildRefusedError", "BuildStatus", "load_build"]
