"""Grammar state of the engine's constrained sequences: one matcher per sequence, the step's
bitmask rows, and what a sampled token does to the sequence.

Everything here is errors-as-state: a matcher that fails (a token it cannot take, a resource
limit mid-stream, an exception from the backend) ends that one sequence, aborted with the error
as its `stop_reason`; nothing raises into the step loop. The mask for step N+1 needs step N's
token: the engine enqueues step N+1's forward, then takes step N's ids (accepting them here) and
fills N+1's rows (`bitmask_rows`) while the device runs that forward; the sampler follows with the
masks (`LLMEngine._launch`, `StepRunner.launch(late_bitmask=...)`). Beside a row with penalties
(the host-built tail) the engine finishes the step in flight first and the rows go through
`bitmask_row`.
"""

from __future__ import annotations

import importlib.util
import logging
import weakref
from typing import Any

import numpy as np

from compiled_serve.engine.sequence import Sequence, SequenceStatus
from compiled_serve.errors import InvalidParameterError
from compiled_serve.kernels.token_bitmask import bitmask_width
from compiled_serve.sampling_params import SamplingParams
from compiled_serve.structured import CompiledGrammar, GrammarMatcher, shared_compiler
from compiled_serve.structured.compiler import resolve_backend

logger = logging.getLogger("compiled_serve.engine")

GrammarEnd = tuple[SequenceStatus, "str | None"]  # (how the sequence finishes, its stop_reason)


def _terminated_safely(matcher: GrammarMatcher) -> bool:
    """Completed without error (a failed matcher also reports itself stopped)."""
    try:
        return matcher.error is None and matcher.is_terminated()
    except Exception:  # noqa: BLE001
        return False


class StructuredState:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: set[int], backend: str = "auto"):
        self.tokenizer, self.vocab_size, self.backend = tokenizer, vocab_size, backend
        if resolve_backend(backend) == "xgrammar" and importlib.util.find_spec("xgrammar") is None:
            raise InvalidParameterError("structured_outputs_backend",
                                        "xgrammar is not installed (pip install 'compiled-serve[xgrammar]')")
        self.eos_token_ids = frozenset(eos_token_ids)
        self.words = bitmask_width(vocab_size)
        self._eos_only = np.zeros(self.words, dtype=np.uint32)  # the row of a failed matcher
        for token in eos_token_ids:
            self._eos_only[token // 32] |= np.uint32(1 << (token % 32))
        # Dropped with their sequence (finished, aborted, or a warm-up's).
        self._matchers: weakref.WeakKeyDictionary[Sequence, GrammarMatcher] = weakref.WeakKeyDictionary()

    def compile(self, params: SamplingParams) -> CompiledGrammar | None:
        """The request's grammar (cached), or None; InvalidParameterError for a bad spec."""
        if params.structured_outputs is None:
            return None
        return shared_compiler(self.tokenizer, self.vocab_size, self.backend).compile(params.structured_outputs)

    def attach(self, seq: Sequence, grammar: CompiledGrammar | None) -> None:
        if grammar is not None:
            self._matchers[seq] = grammar.matcher()

    def constrains(self, seq: Sequence) -> bool:
        return seq in self._matchers

    def bitmask_row(self, seq: Sequence) -> np.ndarray | None:
        """int32 [ceil(V/32)] of the tokens `seq` may sample next, or None if unconstrained.
        A failed matcher allows only EOS this step; `accept` then ends the sequence."""
        matcher = self._matchers.get(seq)
        if matcher is None:
            return None
        row = np.empty(self.words, dtype=np.int32)
        try:
            matcher.fill_bitmask(row)
            failed = matcher.error is not None
        except Exception:  # noqa: BLE001  (a backend bug must not stop the loop)
            logger.exception("grammar mask failed for request %s", seq.request_id)
            failed = True
        if failed or not row.any():
            row[:] = self._eos_only.view(np.int32)
        return row

    def bitmask_rows(self, seqs: list[Sequence]) -> np.ndarray | None:
        """int32 [N, ceil(V/32)] for a step's sampled rows (all ones for unconstrained ones), or
        None when none is constrained (any more: a sequence may have finished on its last token)."""
        rows = [self.bitmask_row(seq) for seq in seqs]
        if all(row is None for row in rows):
            return None
        out = np.full((len(seqs), self.words), -1, dtype=np.int32)
        for j, row in enumerate(rows):
            if row is not None:
                out[j] = row
        return out

    def accept(self, seq: Sequence, token_id: int) -> GrammarEnd | None:
        """Feeds a sampled token to the sequence's matcher: None to go on, else how it ends.

        A grammar that completes on a content token does not end the sequence yet: its next mask
        allows only EOS, so the sequence ends on an EOS token like any other (front ends that
        detokenize outside the engine rely on a "stop" ending in such a token, as vLLM's do)."""
        matcher = self._matchers.get(seq)
        if matcher is None:
            return None
        if token_id in self.eos_token_ids and _terminated_safely(matcher):
            del self._matchers[seq]
            return SequenceStatus.FINISHED_STOPPED, None
        try:
            accepted = matcher.accept_token(token_id) and matcher.error is None
            error = matcher.error
            terminated = accepted and token_id in self.eos_token_ids and matcher.is_terminated()
        except Exception:  # noqa: BLE001
            logger.exception("grammar accept failed for request %s", seq.request_id)
            accepted, error, terminated = False, "the grammar backend failed", False
        if not accepted:
            del self._matchers[seq]
            return SequenceStatus.FINISHED_ABORTED, f"structured output error: {error or 'token rejected'}"
        if terminated:
            del self._matchers[seq]
            return SequenceStatus.FINISHED_STOPPED, None
        return None
