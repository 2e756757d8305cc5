"""The default grammar backend: llguidance (Rust; errors are state, never exceptions).

`compile` builds the grammar text (JSON schema, regex, choice or Lark), constructs one matcher
under `PARSER_LIMITS`, and computes its first bitmask: that forces the lexer's up-front work, so
a spec whose automaton explodes (`(a{1000}){1000}`) fails here, within the fuel limits, as a
400, rather than on the engine's first step. Each sequence then gets a `deep_copy` of that
primed matcher. The llguidance tokenizer is built once per HF tokenizer (about a second).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
from llguidance import LLMatcher
from llguidance.gbnf_to_lark import gbnf_to_lark

from compiled_serve.kernels.token_bitmask import bitmask_width
from compiled_serve.structured.backend import CompiledGrammar, GrammarBackend, GrammarError, GrammarMatcher
from compiled_serve.structured.closed_objects import close_objects
from compiled_serve.structured.spec import StructuredOutputsParams

# llguidance's defaults, with the lexer's fuel lowered so a hostile spec fails in well under a
# second (initial: ~50k/ms, step: ~14k/ms) and the grammar-size cap at a fifth of the default.
PARSER_LIMITS = dict(initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, max_grammar_size=100_000,
                     max_lexer_states=100_000)
# JSON whitespace: none between tokens (the model cannot wander into endless blanks).
JSON_OPTIONS = {"whitespace_flexible": False}
_MAX_ERROR_CHARS = 300


def _short(message: str) -> str:
    """llguidance's error without its state dump (which would echo the grammar back)."""
    first = message.split("\n<state>")[0].strip()
    return first if len(first) <= _MAX_ERROR_CHARS else first[:_MAX_ERROR_CHARS] + "..."


def grammar_text(spec: StructuredOutputsParams) -> str:
    """llguidance's grammar for a spec (not yet checked)."""
    kind = spec.kind
    if kind == "json":
        return LLMatcher.grammar_from_json_schema(close_objects(spec.json), defaults=JSON_OPTIONS)
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":  # Lark string literals are JSON strings
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    try:
        lark = gbnf_to_lark(spec.grammar) if "::=" in spec.grammar else spec.grammar  # GBNF -> Lark
    except Exception as exc:  # the converter's own parse errors  # noqa: BLE001
        raise GrammarError(f"grammar does not parse: {_short(str(exc))}") from None
    return LLMatcher.grammar_from_lark(lark)


class LLGuidanceMatcher(GrammarMatcher):
    def __init__(self, matcher: LLMatcher, words: int):
        self._matcher = matcher
        self._words = words  # int32 words llguidance writes (its vocabulary may be the smaller)

    def fill_bitmask(self, row: np.ndarray) -> None:
        row[self._words:] = 0  # ids past the tokenizer's vocabulary are never allowed
        head = row[: self._words]
        self._matcher.unsafe_compute_mask_ptr(head.ctypes.data, head.nbytes)

    def accept_token(self, token_id: int) -> bool:
        return self._matcher.consume_token(token_id)

    def rollback(self, num_tokens: int) -> bool:
        return self._matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return _short(self._matcher.get_error()) if self._matcher.is_error() else None


class LLGuidanceGrammar(CompiledGrammar):
    def __init__(self, primed: LLMatcher, words: int, nbytes: int):
        self._primed, self._words, self.nbytes = primed, words, nbytes
        self._lock = threading.Lock()  # deep_copy from the engine thread and the server's workers

    def matcher(self) -> GrammarMatcher:
        with self._lock:
            return LLGuidanceMatcher(self._primed.deep_copy(), self._words)


class LLGuidanceBackend(GrammarBackend):
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int):
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        if self.tokenizer.vocab_size > vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens, the model {vocab_size}")
        self.words = bitmask_width(self.tokenizer.vocab_size)
        self.limits = llguidance.LLParserLimits(**PARSER_LIMITS)

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        try:
            text = grammar_text(spec)
        except ValueError as exc:  # grammar_from_json_schema on something that is not JSON
            raise GrammarError(_short(str(exc))) from None
        matcher = LLMatcher(self.tokenizer, text, log_level=0, limits=self.limits)
        if not matcher.is_error():
            matcher.compute_bitmask()  # the first mask: the lexer's up-front work, under its fuel
        if matcher.is_error():
            raise GrammarError(_short(matcher.get_error()))
        # The cache's charge: the grammar text plus a fixed allowance for the primed lexer and
        # parser (llguidance does not report its memory; states cost ~1-2 kB each).
        return LLGuidanceGrammar(matcher, self.words, nbytes=2 * len(text) + 64 * 1024)
