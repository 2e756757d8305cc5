"""One sequence being generated: its tokens, its progress through the KV cache, its blocks.

A request with `n > 1` owns n sequences that share the prompt (and, through the prefix cache,
its KV blocks).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compiled_serve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH, SequenceStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n samples
    prompt_token_ids: list[int]
    params: SamplingParams
    max_output_tokens: int  # max_tokens, capped by the context length
    seed: int = 0  # signed int64 Philox key of this sequence's draws (offset = output length)
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # prompt + output, kept in step
    num_computed_tokens: int = 0  # tokens whose K/V sit in the cache
    # Tokens sampled by a step still on the device (asynchronous scheduling: 0 or 1). They are
    # not in token_ids yet, but the scheduler counts them: the next step computes them.
    num_pending: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # one per full block of token_ids
    num_cached_tokens: int = -1  # prefix-cache hit on first schedule (-1: not scheduled yet)
    stop_reason: int | str | None = None
    # Per generated token: (sampled logprob, rank, top ids, top values) when logprobs were asked.
    logprobs: list[Any] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    logprob_entries: list[Any] = field(default_factory=list)  # user-facing dicts, built once per token
    num_emitted: int = 0  # output tokens already handed out (delta outputs)
    detokenizer: Any = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)
