"""Structured outputs: a spec (`StructuredOutputsParams`), a grammar backend interface with
llguidance as the default, a bounded compile cache, and the compiler the front ends call before
a request reaches the scheduler. The engine keeps per-sequence matchers
(compiled_serve/engine/structured_state.py); the fused sampler applies their bitmask
(kernels/token_bitmask.py)."""

from compiled_serve.structured.backend import (
    CompiledGrammar,
    GrammarBackend,
    GrammarError,
    GrammarMatcher,
    create_backend,
    register_backend,
)
from compiled_serve.structured.cache import GrammarCache
from compiled_serve.structured.compiler import GrammarCompiler, shared_compiler
from compiled_serve.structured.spec import StructuredOutputsParams

__all__ = [
    "CompiledGrammar", "GrammarBackend", "GrammarCache", "GrammarCompiler", "GrammarError", "GrammarMatcher",
    "StructuredOutputsParams", "create_backend", "register_backend", "shared_compiler",
]
