"""Errors a user can hit. Each says what was wrong and, where it helps, what to do."""

from __future__ import annotations


class CompiledServeError(Exception):
    """Base class for every error this package raises on purpose."""


class InvalidParameterError(CompiledServeError, ValueError):
    """A request or sampling parameter is invalid. `field` names the offending field."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class ModelLoadError(CompiledServeError):
    """A model could not be found, read or mapped onto an architecture."""


class CompilationError(CompiledServeError):
    """A graph pass or the compiler could not build the model (never served unrewritten)."""


class CapacityError(CompiledServeError):
    """The engine cannot take the request right now (queue full, or it can never fit)."""
