"""Request body -> SamplingParams, with the checks that belong to the HTTP layer."""

from __future__ import annotations

from compiled_serve.errors import InvalidParameterError
from compiled_serve.sampling_params import SamplingParams
from compiled_serve.server.protocol import SamplingFields
from compiled_serve.server.structured import structured_spec

# OpenAI's legacy completions default; chat completions default to the rest of the context.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def build_sampling_params(request: SamplingFields, *, max_tokens: int | None,
                          logprobs: int | None) -> SamplingParams:
    """Raises InvalidParameterError (-> 400 with `param`) for anything the engine cannot honour."""
    structured = structured_spec(request)
    if request.best_of is not None and request.best_of != request.n:
        raise InvalidParameterError("best_of", "best_of different from n is not supported")
    optional = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "repetition_penalty": request.repetition_penalty,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
    }
    return SamplingParams(
        n=request.n,
        logit_bias=dict(request.logit_bias) if request.logit_bias else None,
        seed=request.seed,
        stop=request.stop_list(),
        stop_token_ids=list(request.stop_token_ids or []),
        ignore_eos=request.ignore_eos,
        max_tokens=max_tokens,
        min_tokens=request.min_tokens,
        logprobs=logprobs,
        include_stop_str_in_output=request.include_stop_str_in_output,
        skip_special_tokens=request.skip_special_tokens,
        structured_outputs=structured[0] if structured is not None else None,
        **{name: value for name, value in optional.items() if value is not None},
    )
