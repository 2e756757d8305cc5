"""The wire format between the API server and the engine-core process: msgpack maps, never pickle.

Every message is one msgpack map with a "type" key, sent with `Connection.send_bytes` (or any
byte transport). Server -> core:

    init      {"config": EngineConfig fields, "log_level": str}            (first message)
    add       {"id", "prompt_token_ids", "params": SamplingParams fields}
    abort     {"ids": [request ids]}
    stats     {}                                                 (answered at once by "stats")
    shutdown  {}

Core -> server:

    ready          {"model": facts the server needs, "tokenizer_files": {name: bytes} | None, "stats"}
    startup_error  {"kind": exception class name, "message"}
    step           {"acks": [{"id", "error"}], "outputs": [delta outputs], "stats"}   (one per step)
    stats          {"stats"}
    dead           {"message"}                                              (the core's loop failed)

Outputs are the engine's "delta" RequestOutputs of requests added with `detokenize=False`: per
sample only the new token ids and logprob entries; the server detokenizes. Decoding builds only
plain dataclasses from plain values, so a hostile peer can at worst send wrong numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from compiled_serve.config import EngineConfig
from compiled_serve.engine.stats import EngineStats
from compiled_serve.errors import InvalidParameterError
from compiled_serve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from compiled_serve.sampling_params import SamplingParams


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    # Integer keys: logit_bias maps token ids to biases.
    message = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError("not an engine-core message")
    return message


# ---------------------------------------------------------------- config, params, stats
def encode_config(config: EngineConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def decode_config(fields: dict[str, Any]) -> EngineConfig:
    """msgpack turns tuples into lists; the tuple-typed fields get theirs back."""
    tuples = {f.name for f in dataclasses.fields(EngineConfig) if "tuple" in str(f.type)}
    return EngineConfig(**{name: tuple(value) if name in tuples and value is not None else value
                           for name, value in fields.items()})


def encode_params(params: SamplingParams) -> dict[str, Any]:
    return dataclasses.asdict(params)


def decode_params(fields: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**fields)  # __post_init__ checks every field again


def encode_stats(stats: EngineStats) -> dict[str, Any]:
    return dataclasses.asdict(stats)


def decode_stats(fields: dict[str, Any]) -> EngineStats:
    return EngineStats(**fields)


def encode_error(exc: BaseException) -> dict[str, Any]:
    """An add the engine refused. Only InvalidParameterError's text goes back (it names the bad
    field and value and nothing internal); anything else is reported by its class name only."""
    if isinstance(exc, InvalidParameterError):
        return {"field": exc.field, "message": exc.message}
    return {"field": None, "message": f"the engine refused the request ({type(exc).__name__})"}


def decode_error(fields: dict[str, Any]) -> Exception:
    if fields["field"] is not None:
        return InvalidParameterError(fields["field"], fields["message"])
    return RuntimeError(fields["message"])


# ---------------------------------------------------------------- outputs
def _encode_logprobs(entries: list[dict[int, Logprob]] | None) -> list[list[list[Any]]] | None:
    if entries is None:
        return None
    return [[[token, lp.logprob, lp.rank, lp.decoded_token] for token, lp in entry.items()] for entry in entries]


def _decode_logprobs(rows: list[list[list[Any]]] | None) -> list[dict[int, Logprob]] | None:
    if rows is None:
        return None
    return [{int(token): Logprob(float(lp), int(rank), decoded) for token, lp, rank, decoded in row}
            for row in rows]


def encode_output(output: RequestOutput) -> dict[str, Any]:
    """A delta output, without the prompt (the server sent it and keeps it)."""
    m = output.metrics
    return {
        "id": output.request_id, "finished": output.finished, "cached": output.num_cached_tokens,
        "metrics": None if m is None else [m.arrival_time, m.first_scheduled_time, m.first_token_time],
        "samples": [[c.index, c.token_ids, c.cumulative_logprob, _encode_logprobs(c.logprobs), c.finish_reason,
                     c.stop_reason] for c in output.outputs],
    }


def decode_output(fields: dict[str, Any]) -> RequestOutput:
    m = fields["metrics"]
    samples = [CompletionOutput(index=index, text="", token_ids=list(token_ids), cumulative_logprob=cumulative,
                                logprobs=_decode_logprobs(logprobs), finish_reason=finish, stop_reason=stop)
               for index, token_ids, cumulative, logprobs, finish, stop in fields["samples"]]
    return RequestOutput(request_id=fields["id"], prompt=None, prompt_token_ids=[], outputs=samples,
                         finished=bool(fields["finished"]), num_cached_tokens=int(fields["cached"]),
                         metrics=None if m is None else RequestMetrics(*m))
