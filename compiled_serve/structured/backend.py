"""The grammar backend interface: compile a spec, one matcher per sequence, bitmask rows.

A backend turns a `StructuredOutputsParams` into a `CompiledGrammar` (immutable, shared through
the cache by every sequence with the same spec); each sequence gets its own `GrammarMatcher`.
Errors are state, not exceptions: `compile` raises `GrammarError` (the spec is bad: a 400), and a
matcher that fails later (a token it cannot take, a resource limit mid-stream) reports `error`;
the engine then finishes that one sequence. Backends register by name (`register_backend`), so a
new library plugs in without editing the engine.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import numpy as np

from compiled_serve.structured.spec import StructuredOutputsParams


class GrammarError(ValueError):
    """A spec the backend cannot compile (invalid, unsupported, or over a resource limit)."""


class GrammarMatcher(abc.ABC):
    """One sequence's position in its grammar."""

    @abc.abstractmethod
    def fill_bitmask(self, row: np.ndarray) -> None:
        """Writes the allowed next tokens into `row` (int32 [ceil(V/32)], bit t % 32 of word t // 32)."""

    @abc.abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advances by one sampled token; False (and `error` set) if the grammar cannot take it."""

    @abc.abstractmethod
    def rollback(self, num_tokens: int) -> bool:
        """Undoes the last `num_tokens` accepted tokens (speculative decoding, preemption)."""

    @abc.abstractmethod
    def is_terminated(self) -> bool:
        """The grammar is complete and allows nothing more (the sequence should stop)."""

    @property
    @abc.abstractmethod
    def error(self) -> str | None:
        """Why the matcher failed, or None."""


class CompiledGrammar(abc.ABC):
    nbytes: int  # what the cache charges for it (an estimate of its memory)

    @abc.abstractmethod
    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the grammar's start."""


class GrammarBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Raises GrammarError for a spec it cannot compile. May run in a worker thread."""


BackendFactory = Callable[[Any, int], GrammarBackend]  # (HF tokenizer, model vocab size) -> backend
_BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    _BACKENDS[name] = factory


def create_backend(name: str, tokenizer: Any, vocab_size: int) -> GrammarBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown grammar backend {name!r}; registered: {sorted(_BACKENDS)}")
    return _BACKENDS[name](tokenizer, vocab_size)
