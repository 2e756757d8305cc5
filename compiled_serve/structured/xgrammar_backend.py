"""The optional second grammar backend: xgrammar (`pip install 'compiled-serve[xgrammar]'`).

Selected with `EngineConfig.structured_outputs_backend="xgrammar"` (`--structured-outputs-backend
xgrammar`); the default stays llguidance (docs/perf-notes.md, "structured outputs on the CPU",
has both measured on SmolLM2's tokenizer). Same interface, same outputs:

- JSON schemas go through `close_objects` too (xgrammar's strict mode closes the same objects)
  and compile with no whitespace between tokens, `,` and `:` separators, as llguidance's do;
- regexes, choices (an EBNF alternation of string literals), Lark grammars (`Grammar.from_lark`)
  and GBNF (`::=`, xgrammar's own EBNF dialect) compile as they are;
- keywords xgrammar's converter accepts but does not enforce (`not`, `if`/`then`/`else`,
  `multipleOf` on a non-integer number, `allOf` of several schemas: measured, an instance that
  breaks them is accepted) are a GrammarError, so the request gets a 400 naming the field rather
  than an output that fails validation;
- added special tokens other than EOS are never allowed (as with llguidance);
- JSON specs never allow a token holding a raw control character (below 0x20): xgrammar 0.2.9
  lets a string with minLength/maxLength take them unescaped, which is not JSON (measured:
  `"a\x01b"` completes `{"type": "string", "maxLength": 20}`); no compact JSON holds one;
- xgrammar raises where llguidance reports state: every exception of its compile is a
  GrammarError, and a matcher whose `accept_token` refuses a token, or raises, reports `error`.

xgrammar has no fuel limits: the compiler's timeout (compiler.py) and the backend-independent
bounds (checks.py) are what bound a hostile spec. Its own compile cache is off (ours is bounded
in entries and bytes). Its stop tokens are the tokenizer's EOS (SmolLM2: `<|im_end|>`, which the
engine stops on too): a completed grammar's next mask allows only those.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import xgrammar as xgr

from compiled_serve.kernels.token_bitmask import bitmask_width
from compiled_serve.structured.backend import CompiledGrammar, GrammarBackend, GrammarError, GrammarMatcher
from compiled_serve.structured.closed_objects import close_objects
from compiled_serve.structured.spec import StructuredOutputsParams

COMPILE_THREADS = 2  # xgrammar's compile workers (its default is 8; this machine class has few cores)
_MAX_ERROR_CHARS = 300


def _short(message: str) -> str:
    """xgrammar's message without its `[time] /path/file.cc:line: ` prefix."""
    first = message.strip().splitlines()[0] if message.strip() else "the grammar does not compile"
    if first.startswith("[") and ": " in first:
        first = first.split(": ", 1)[1]
    return first if len(first) <= _MAX_ERROR_CHARS else first[:_MAX_ERROR_CHARS] + "..."


def unenforced_keyword(schema: Any) -> str | None:
    """The first keyword in `schema` xgrammar would accept and then not enforce, or None."""
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        for key in ("not", "if"):
            if key in item:
                return key
        if isinstance(item.get("allOf"), list) and len(item["allOf"]) > 1:
            return "allOf (of more than one schema)"
        step = item.get("multipleOf")
        if step is not None and (item.get("type") != "integer" or not float(step).is_integer()):
            return "multipleOf (on a number that is not an integer)"
        stack.extend(v for k, v in item.items() if k not in ("enum", "const", "examples", "default"))
    return None


class XGrammarMatcher(GrammarMatcher):
    def __init__(self, matcher: xgr.GrammarMatcher, keep: np.ndarray | None):
        self._matcher, self._keep = matcher, keep
        self._error: str | None = None

    def fill_bitmask(self, row: np.ndarray) -> None:
        self._matcher.fill_next_token_bitmask(row.reshape(1, -1), 0)
        if self._keep is not None:
            np.bitwise_and(row, self._keep, out=row)

    def accept_token(self, token_id: int) -> bool:
        try:
            accepted = self._matcher.accept_token(token_id)
        except Exception as exc:  # noqa: BLE001  (errors are state here)
            self._error = _short(str(exc))
            return False
        if not accepted:
            self._error = f"token {token_id} is not allowed here"
        return accepted

    def rollback(self, num_tokens: int) -> bool:
        try:
            self._matcher.rollback(num_tokens)
        except Exception as exc:  # noqa: BLE001
            self._error = _short(str(exc))
            return False
        self._error = None
        return True

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()

    @property
    def error(self) -> str | None:
        return self._error


class XGrammarGrammar(CompiledGrammar):
    def __init__(self, compiled: xgr.CompiledGrammar, stop_token_ids: list[int], keep: np.ndarray | None):
        self._compiled, self._stop, self._keep = compiled, stop_token_ids, keep
        self.nbytes = int(compiled.memory_size_bytes)

    def matcher(self) -> GrammarMatcher:
        return XGrammarMatcher(xgr.GrammarMatcher(self._compiled, override_stop_tokens=self._stop), self._keep)


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int):
        detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        # xgrammar reads added special tokens as their text (`<|im_start|>` would be allowed inside
        # a JSON string, and the detokenizer then drops it); an empty entry is a special token it
        # never allows. llguidance never allows them either.
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        special -= set(detected.stop_token_ids)
        vocab = [""] * vocab_size
        for text, token in tokenizer.get_vocab().items():
            if token < vocab_size and token not in special:
                vocab[token] = text
        self.info = xgr.TokenizerInfo(vocab, detected.vocab_type, vocab_size=vocab_size,
                                      stop_token_ids=detected.stop_token_ids,
                                      add_prefix_space=detected.add_prefix_space)
        self.stop_token_ids = list(self.info.stop_token_ids)
        self.words = bitmask_width(vocab_size)
        # JSON specs: every token but those holding a raw control byte (below 0x20).
        keep = np.zeros(self.words * 32, dtype=bool)
        for token, text in enumerate(self.info.decoded_vocab[:vocab_size]):
            keep[token] = not any(byte < 0x20 for byte in text)
        keep[self.stop_token_ids] = True
        self.json_keep = np.packbits(keep, bitorder="little").view(np.int32)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=COMPILE_THREADS, cache_enabled=False)

    def _compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        kind = spec.kind
        if kind == "json":
            unenforced = unenforced_keyword(spec.json)
            if unenforced is not None:
                raise GrammarError(f"the xgrammar backend does not enforce {unenforced}; "
                                   "serve with --structured-outputs-backend guidance")
            return self.compiler.compile_json_schema(close_objects(spec.json), any_whitespace=False,
                                                     separators=(",", ":"))
        if kind == "json_object":
            return self.compiler.compile_json_schema({"type": "object"}, any_whitespace=False,
                                                     separators=(",", ":"))
        if kind == "regex":
            return self.compiler.compile_regex(spec.regex)
        if kind == "choice":
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
            return self.compiler.compile_grammar("root ::= " + alternatives)
        if "::=" in spec.grammar:  # GBNF: xgrammar's EBNF dialect
            return self.compiler.compile_grammar(spec.grammar)
        return self.compiler.compile_grammar(xgr.Grammar.from_lark(spec.grammar))

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        try:
            compiled = self._compile(spec)
        except GrammarError:
            raise
        except Exception as exc:  # noqa: BLE001  (RuntimeError, InvalidJSONError, ...: all a bad spec)
            raise GrammarError(_short(str(exc))) from None
        keep = self.json_keep if spec.kind in ("json", "json_object") else None
        return XGrammarGrammar(compiled, self.stop_token_ids, keep)
