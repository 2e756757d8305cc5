"""GrammarCompiler: spec -> compiled grammar, checked, cached, and bounded in time.

Runs before a request reaches the scheduler (the server's handlers, `LLM.generate`, and
`LLMEngine.add_request` for callers that skip both): every failure is an `InvalidParameterError`
naming the field (a 400), never an exception in the engine loop. The compile itself runs in a
small worker pool and is abandoned after `timeout_s` (the backend's fuel limits stop the worker
soon after); equal specs hit the bounded cache.
"""

from __future__ import annotations

import concurrent.futures
import threading
import weakref
from typing import Any

from compiled_serve.errors import InvalidParameterError
from compiled_serve.structured.backend import (
    CompiledGrammar,
    GrammarBackend,
    GrammarError,
    create_backend,
    register_backend,
)
from compiled_serve.structured.cache import GrammarCache
from compiled_serve.structured.checks import check_choices, check_json_schema, check_regex, check_text_size
from compiled_serve.structured.spec import StructuredOutputsParams

DEFAULT_BACKEND = "llguidance"
# `EngineConfig.structured_outputs_backend` values: vLLM's names (auto, guidance, xgrammar) and ours.
BACKEND_ALIASES = {"auto": DEFAULT_BACKEND, "guidance": "llguidance", "llguidance": "llguidance",
                   "xgrammar": "xgrammar"}
DEFAULT_TIMEOUT_S = 5.0
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-compile")


def precheck(spec: StructuredOutputsParams, field: str) -> None:
    """The backend-independent bounds (checks.py)."""
    kind = spec.kind
    if kind == "json":
        check_json_schema(spec.json, field)
    elif kind == "regex":
        check_regex(spec.regex, field)
    elif kind == "grammar":
        check_text_size(spec.grammar, field, "the grammar")
    elif kind == "choice":
        check_choices(spec.choice, field)


class GrammarCompiler:
    def __init__(self, backend: GrammarBackend, cache: GrammarCache | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.backend = backend
        self.cache = cache if cache is not None else GrammarCache()
        self.timeout_s = timeout_s

    def compile(self, spec: StructuredOutputsParams, field: str | None = None) -> CompiledGrammar:
        """The compiled grammar of `spec`; InvalidParameterError(field or spec.field) if it has none."""
        field = field or spec.field
        key = f"{self.backend.name}|{spec.cache_key()}"
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        precheck(spec, field)
        future = _POOL.submit(self.backend.compile, spec)
        try:
            grammar = future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise InvalidParameterError(field, f"took longer than {self.timeout_s:g} s to compile") from None
        except GrammarError as exc:
            raise InvalidParameterError(field, f"cannot be used as a constraint: {exc}") from None
        except (ValueError, TypeError, RecursionError, MemoryError, OverflowError):
            raise InvalidParameterError(field, "cannot be compiled into a grammar") from None
        self.cache.put(key, grammar)
        return grammar


def _llguidance(tokenizer: Any, vocab_size: int) -> GrammarBackend:
    from compiled_serve.structured.llguidance_backend import LLGuidanceBackend

    return LLGuidanceBackend(tokenizer, vocab_size)


def _xgrammar(tokenizer: Any, vocab_size: int) -> GrammarBackend:
    try:
        from compiled_serve.structured.xgrammar_backend import XGrammarBackend
    except ImportError as exc:
        raise InvalidParameterError("structured_outputs_backend", "xgrammar is not installed "
                                    "(pip install 'compiled-serve[xgrammar]')") from exc
    return XGrammarBackend(tokenizer, vocab_size)


# Imported lazily: no grammar library is imported until its first use.
register_backend(DEFAULT_BACKEND, _llguidance)
register_backend("xgrammar", _xgrammar)


def resolve_backend(name: str | None) -> str:
    """The registered backend a configured name means (auto and vLLM's guidance: llguidance)."""
    name = name or "auto"
    return BACKEND_ALIASES.get(name, name)


_SHARED: dict[tuple[int, int, str], tuple[weakref.ref, GrammarCompiler]] = {}
_SHARED_LOCK = threading.Lock()


def shared_compiler(tokenizer: Any, vocab_size: int, backend: str = DEFAULT_BACKEND) -> GrammarCompiler:
    """One compiler (and cache) per tokenizer in this process, built on first use (the backend's
    tokenizer takes about a second): an in-process server and its engine share compiled grammars."""
    if tokenizer is None:
        raise InvalidParameterError("structured_outputs", "this model has no tokenizer to constrain")
    backend = resolve_backend(backend)
    key = (id(tokenizer), vocab_size, backend)
    with _SHARED_LOCK:
        entry = _SHARED.get(key)
        if entry is not None and entry[0]() is tokenizer:
            return entry[1]
        compiler = GrammarCompiler(create_backend(backend, tokenizer, vocab_size))
        _SHARED[key] = (weakref.ref(tokenizer), compiler)
        return compiler
