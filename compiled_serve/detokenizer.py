"""Incremental detokenization with stop strings.

Decoding the whole output at every step costs O(length) per token. Instead we decode a small
window of token ids twice (the prefix_offset / read_offset technique of HF TGI and vLLM):

    ids:  ... | prefix_offset ........ read_offset ........ end |
               \\____ prefix_text ____/
               \\_______________ new_text _____________________/

The delta is new_text minus prefix_text. Starting both decodes at the same token keeps
context-dependent decoding (a leading-space marker, WordPiece "##" joins) identical in the two,
so it cancels. When new_text ends in U+FFFD the last token ended inside a multi-byte UTF-8
character: nothing is emitted until the character is complete. On emission the window slides:
prefix_offset <- read_offset, read_offset <- end.

Stop strings are searched in the decoded text, across token boundaries. While running, a
suffix of the text that could still grow into a stop string is held back; `finish()` flushes it.

The engine's interface is small: `add_tokens(ids)` per sampled token, `finish()` when the
sequence ends for another reason (EOS, stop token, length), `stop_hit` to learn that a stop
string ended it, and `output_text` for the RequestOutput. `output_text` is exactly the
concatenation of the deltas returned so far: text that a stop string can no longer cut, so a
stream built from it never has to take anything back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as decoding context for the first output tokens (as vLLM does).
_PROMPT_CONTEXT_TOKENS = 5


def decode_token(tokenizer: Any, token_id: int) -> str:
    """The text of one token, for logprob display (special tokens included; a lone byte of a
    multi-byte character shows as U+FFFD)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Token ids: a few trailing prompt tokens as context, then the output tokens.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stops = tuple(stop)
        self._include_stop = include_stop_str_in_output
        # Every proper prefix of a stop string: a text ending in one of them may be in a stop.
        self._stop_prefixes = {s[:k] for s in self._stops for k in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self._stops), default=0)
        self._text = ""  # decoded output text (cut at the stop string once one is hit)
        self._num_emitted = 0  # characters of _text already returned as deltas
        self._finished = False
        self.stop_hit: str | None = None

    @property
    def output_text(self) -> str:
        """The text that can no longer change: while running, all but the suffix held back as a
        possible start of a stop string; after a stop string or finish(), the whole final text.
        It only ever grows, so consumers may stream `output_text[len(sent):]`."""
        return self._text[: self._num_emitted]

    @property
    def finished(self) -> bool:
        return self._finished or self.stop_hit is not None

    def add_tokens(self, new_ids: Sequence[int]) -> str:
        """Appends sampled token ids; returns the text that can be streamed now (maybe "").

        After a stop string was hit (or after finish()) this is a no-op returning "".
        """
        if self.finished or not new_ids:
            return ""
        self._ids.extend(new_ids)
        self._append(self._decode_window(final=False))
        return self._take_deltas(flush=self.stop_hit is not None)

    def finish(self) -> str:
        """Ends the sequence: decodes any incomplete tail (as U+FFFD) and releases held text."""
        if not self.finished:
            self._append(self._decode_window(final=True))
        self._finished = True
        return self._take_deltas(flush=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_window(self, final: bool) -> str:
        """New text of the tokens after read_offset, or "" while it ends mid-character."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if new_text.endswith(_REPLACEMENT_CHAR) and not final:
            return ""  # the last token ends inside a UTF-8 character: wait for its other bytes
        common = len(prefix_text)
        if not new_text.startswith(prefix_text):
            # Only when the prefix itself ended mid-character (a prompt cut inside one).
            common = next((i for i, (a, b) in enumerate(zip(prefix_text, new_text)) if a != b), common)
        if len(new_text) <= common:
            return ""  # e.g. only skipped special tokens so far: keep widening the window
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[common:]

    def _append(self, text: str) -> None:
        """Adds decoded text and cuts it at the first stop string that completes in it."""
        if not text:
            return
        searched = len(self._text)
        self._text += text
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            # Older text was searched already; a new match must end inside the new text.
            start = self._text.find(stop, max(0, searched - len(stop) + 1))
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is not None:
            # The stop that completes first wins, as if the text had arrived one char at a time.
            end, start, stop = best
            self._text = self._text[: end if self._include_stop else start]
            self.stop_hit = stop

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        for length in range(min(self._max_hold, len(self._text) - self._num_emitted), 0, -1):
            if self._text[-length:] in self._stop_prefixes:
                return length
        return 0

    def _take_deltas(self, flush: bool) -> str:
        end = len(self._text) if flush else len(self._text) - self._held_back()
        delta = self._text[self._num_emitted : end]
        self._num_emitted = max(self._num_emitted, end)
        return delta
