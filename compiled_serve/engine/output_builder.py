"""Builds the user-facing RequestOutput of a request from its sequences' state."""

from __future__ import annotations

from typing import Any

from compiled_serve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput


def _decode(tokenizer: Any, token_id: int) -> str | None:
    return None if tokenizer is None else tokenizer.decode([token_id])


def _logprobs(seq: Any, tokenizer: Any) -> list[dict[int, Logprob]] | None:
    """The sequence's logprob dicts; each token's is built (and its tokens decoded) only once."""
    if seq.params.logprobs is None:
        return None
    built = seq.logprob_entries
    for token, (lp, rank, top_ids, top_vals) in zip(seq.output_token_ids[len(built):], seq.logprobs[len(built):]):
        entry = {token: Logprob(lp, rank if rank is not None else 0, _decode(tokenizer, token))}
        for r, (tid, val) in enumerate(zip(top_ids, top_vals), start=1):
            if tid not in entry:
                entry[tid] = Logprob(val, r, _decode(tokenizer, tid))
        built.append(entry)
    return list(built)


def build_request_output(req: Any, tokenizer: Any, delta: bool = False) -> RequestOutput:
    """Cumulative (every token so far), or with `delta` only what is new since the last output:
    the new token ids and logprob entries of each sample (its text is then the detokenizer's
    whole text, or "" for a request the engine does not detokenize)."""
    outputs = []
    for seq in req.seqs:
        if delta:
            start, seq.num_emitted = seq.num_emitted, len(seq.output_token_ids)
            logprobs = _logprobs(seq, tokenizer)
            outputs.append(CompletionOutput(
                index=seq.index, text=seq.detokenizer.output_text if seq.detokenizer is not None else "",
                token_ids=seq.output_token_ids[start:],
                cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                logprobs=logprobs[start:] if logprobs is not None else None,
                finish_reason=seq.status.value if seq.status.finished else None, stop_reason=seq.stop_reason,
            ))
            continue
        # Only text no stop string can still cut: from one output to the next it only grows.
        text = seq.detokenizer.output_text if seq.detokenizer is not None else ""
        finish = seq.status.value if seq.status.finished else None
        outputs.append(CompletionOutput(
            index=seq.index, text=text, token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
            logprobs=_logprobs(seq, tokenizer), finish_reason=finish, stop_reason=seq.stop_reason,
        ))
    cached = max(0, min((s.num_cached_tokens for s in req.seqs), default=0))
    scheduled = [s.first_scheduled_time for s in req.seqs if s.first_scheduled_time is not None]
    first_tokens = [s.first_token_time for s in req.seqs if s.first_token_time is not None]
    metrics = RequestMetrics(arrival_time=min(s.arrival_time for s in req.seqs),
                             first_scheduled_time=min(scheduled, default=None),
                             first_token_time=min(first_tokens, default=None))
    return RequestOutput(
        request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids, outputs=outputs,
        finished=all(s.status.finished for s in req.seqs), num_cached_tokens=cached, metrics=metrics,
    )
