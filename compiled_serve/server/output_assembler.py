"""Turns the engine core's delta outputs (new token ids per sample, no text) into the cumulative
RequestOutputs the endpoints consume: incremental detokenization and stop strings, in the server.

The rules are the in-process engine's, so both modes stream the same text:
- EOS and stop tokens end a sample without entering its text (they stay in token_ids). The core
  checks no stop strings, so its finish_reason "stop" always means such a token, the last one.
- A stop string ends the sample at the token that completed it; `IncrementalDetokenizer` cuts
  the text (keeping the stop string with `include_stop_str_in_output`) and holds back any suffix
  that could still become one, so `text` only grows.
- A sample stopped here may keep generating in the core until the whole request is done there
  (the core aborts whole requests): its later tokens are dropped. Once every sample of a request
  has finished here but the core has not said so, `needs_abort` asks the caller to abort it.
"""

from __future__ import annotations

from typing import Any

from compiled_serve.detokenizer import IncrementalDetokenizer
from compiled_serve.outputs import CompletionOutput, Logprob, RequestOutput
from compiled_serve.sampling_params import SamplingParams


class _Sample:
    def __init__(self, index: int, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        self.index = index
        self.detokenizer = None if tokenizer is None else IncrementalDetokenizer(
            tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop or [],
            include_stop_str_in_output=params.include_stop_str_in_output)
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def apply(self, delta: CompletionOutput) -> None:
        if self.finish_reason is not None:
            return  # stopped by a stop string here; the core's later tokens are not part of it
        engine_stop = delta.finish_reason == "stop"
        kept = len(delta.token_ids)
        for k, token in enumerate(delta.token_ids):
            if self.detokenizer is None or (engine_stop and k == kept - 1):
                continue
            self.detokenizer.add_tokens([token])
            if self.detokenizer.stop_hit is not None:
                self.finish_reason, self.stop_reason = "stop", self.detokenizer.stop_hit
                kept = k + 1
                break
        self.token_ids += delta.token_ids[:kept]
        new_logprobs = (delta.logprobs or [])[:kept]
        if self.logprobs is not None:
            self.logprobs += new_logprobs
        if kept == len(delta.token_ids):
            self.cumulative_logprob = delta.cumulative_logprob
        elif self.cumulative_logprob is not None or delta.cumulative_logprob is not None:
            # Cut inside a delta: the engine's sum included tokens that are not part of the sample.
            picked = [entry[token].logprob for token, entry in zip(delta.token_ids, new_logprobs) if token in entry]
            self.cumulative_logprob = (self.cumulative_logprob or 0.0) + sum(picked)
        if self.finish_reason is None and delta.finish_reason is not None:
            if self.detokenizer is not None:
                self.detokenizer.finish()  # releases the text held back for a possible stop string
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason

    def output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index, text=self.detokenizer.output_text if self.detokenizer is not None else "",
            token_ids=list(self.token_ids), cumulative_logprob=self.cumulative_logprob,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason)


class RequestAssembler:
    """One request's samples on the server side; `apply` each delta output in order."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer: Any):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self._samples = [_Sample(i, tokenizer, prompt_token_ids, params) for i in range(params.n)]
        self.engine_finished = False

    @property
    def finished(self) -> bool:
        return all(sample.finish_reason is not None for sample in self._samples)

    @property
    def needs_abort(self) -> bool:
        """Every sample finished here (stop strings) while the core still runs the request."""
        return self.finished and not self.engine_finished

    def apply(self, delta: RequestOutput) -> RequestOutput:
        """The cumulative output after `delta` (new lists: earlier outputs stay as they were)."""
        self.engine_finished = self.engine_finished or delta.finished
        for completion in delta.outputs:
            self._samples[completion.index].apply(completion)
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            outputs=[sample.output() for sample in self._samples], finished=self.finished,
            num_cached_tokens=delta.num_cached_tokens, metrics=delta.metrics)
