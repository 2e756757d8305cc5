"""Per-request sampling parameters (vLLM/OpenAI-compatible names and defaults).

Everything a user can send is checked in `__post_init__`: types (a bool is not an int),
finiteness, ranges. Model-dependent limits (vocabulary size, logprob and n caps) are checked
by `validate_for_model` once the engine knows the model. Both raise `InvalidParameterError`
naming the field and the bad value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from compiled_serve.errors import InvalidParameterError
from compiled_serve.structured.spec import StructuredOutputsParams


def _number_text(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


@dataclass(frozen=True)
class Bounds:
    """The one statement of a numeric limit: `SamplingParams` enforces it, and the HTTP protocol
    models publish the same numbers in their OpenAPI schema (`pydantic_kwargs`).

    [low, high], or (low, high] with `low_open`; `high` None means no upper limit."""

    low: float
    high: float | None = None
    low_open: bool = False

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and (self.high is None or value <= self.high)

    def describe(self) -> str:
        low = _number_text(self.low)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"in {'(' if self.low_open else '['}{low}, {_number_text(self.high)}]"

    def pydantic_kwargs(self) -> dict[str, float]:
        kwargs = {"gt" if self.low_open else "ge": self.low}
        if self.high is not None:
            kwargs["le"] = self.high
        return kwargs


N_BOUNDS = Bounds(1)
TEMPERATURE_BOUNDS = Bounds(0.0, 100.0)
TOP_P_BOUNDS = Bounds(0.0, 1.0, low_open=True)
TOP_K_BOUNDS = Bounds(-1, 2**31 - 1)  # 0 or -1 = disabled
MIN_P_BOUNDS = Bounds(0.0, 1.0)
REPETITION_PENALTY_BOUNDS = Bounds(0.0, 10.0, low_open=True)
PRESENCE_PENALTY_BOUNDS = FREQUENCY_PENALTY_BOUNDS = Bounds(-2.0, 2.0)
LOGIT_BIAS_BOUNDS = Bounds(-100.0, 100.0)
SEED_BOUNDS = Bounds(-(2**63), 2**63 - 1)
MAX_TOKENS_BOUNDS = Bounds(1)
MIN_TOKENS_BOUNDS = Bounds(0)
LOGPROBS_BOUNDS = Bounds(0)
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
# Below this a temperature only overflows the logits; such rows take the argmax instead.
GREEDY_TEMPERATURE = 1e-5
_INT_STRING = re.compile(r"[+-]?\d+")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: object, bounds: Bounds, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_int(value):
        raise InvalidParameterError(name, f"must be an integer, got {value!r} ({type(value).__name__})")
    if not bounds.contains(value):
        raise InvalidParameterError(name, f"must be {bounds.describe()}, got {value!r}")


def _check_float(name: str, value: object, bounds: Bounds) -> float:
    """Checks a finite real within `bounds`; returns it as float."""
    if not _is_number(value):
        raise InvalidParameterError(name, f"must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidParameterError(name, f"must be finite, got {value!r}")
    if not bounds.contains(value):
        raise InvalidParameterError(name, f"must be {bounds.describe()}, got {value!r}")
    return value


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidParameterError(name, f"must be a boolean, got {value!r} ({type(value).__name__})")


def _token_id(name: str, key: object) -> int:
    """A token id given as an int or, as OpenAI's JSON logit_bias keys are, an int-like string."""
    if _is_int(key):
        token_id = key
    elif isinstance(key, str) and _INT_STRING.fullmatch(key.strip()):
        token_id = int(key)
    else:
        raise InvalidParameterError(name, f"token ids must be integers, got {key!r}")
    if token_id < 0:
        raise InvalidParameterError(name, f"token ids must be >= 0, got {token_id}")
    return token_id


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 (or below 1e-5) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics over prompt + output tokens
    presence_penalty: float = 0.0  # OpenAI semantics over output tokens
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # keys may arrive as int-like strings (JSON)
    seed: int | None = None
    stop: str | list[str] | None = None  # normalized to a list
    stop_token_ids: list[int] | None = None  # normalized to a list
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # top logprobs per token; 0 = only the sampled token's
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # A grammar constraint (vLLM's name and shape); plain data, compiled where the engine runs.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n, N_BOUNDS)
        self.temperature = _check_float("temperature", self.temperature, TEMPERATURE_BOUNDS)
        self.top_p = _check_float("top_p", self.top_p, TOP_P_BOUNDS)
        _check_int("top_k", self.top_k, TOP_K_BOUNDS)
        self.min_p = _check_float("min_p", self.min_p, MIN_P_BOUNDS)
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty,
                                               REPETITION_PENALTY_BOUNDS)
        self.presence_penalty = _check_float("presence_penalty", self.presence_penalty, PRESENCE_PENALTY_BOUNDS)
        self.frequency_penalty = _check_float("frequency_penalty", self.frequency_penalty, FREQUENCY_PENALTY_BOUNDS)
        self.logit_bias = self._normalized_logit_bias()
        _check_int("seed", self.seed, SEED_BOUNDS, optional=True)
        self.stop = self._normalized_stop()
        self.stop_token_ids = self._normalized_stop_token_ids()
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check_bool(name, getattr(self, name))
        _check_int("max_tokens", self.max_tokens, MAX_TOKENS_BOUNDS, optional=True)
        _check_int("min_tokens", self.min_tokens, MIN_TOKENS_BOUNDS)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameterError(
                "min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        _check_int("logprobs", self.logprobs, LOGPROBS_BOUNDS, optional=True)
        # A dict (as msgpack carries it) becomes the dataclass again; its own checks run.
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)

    def _normalized_logit_bias(self) -> dict[int, float] | None:
        if self.logit_bias is None:
            return None
        if not isinstance(self.logit_bias, dict):
            raise InvalidParameterError("logit_bias", f"must be a mapping of token id to bias, got {self.logit_bias!r}")
        bias: dict[int, float] = {}
        for key, value in self.logit_bias.items():
            token_id = _token_id("logit_bias", key)
            bias[token_id] = _check_float(f"logit_bias[{token_id}]", value, LOGIT_BIAS_BOUNDS)
        return bias

    def _normalized_stop(self) -> list[str]:
        stop = self.stop
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise InvalidParameterError("stop", f"must be a string or a list of strings, got {stop!r}")
        for item in stop:
            if not isinstance(item, str):
                raise InvalidParameterError("stop", f"stop strings must be strings, got {item!r}")
            if not item:
                raise InvalidParameterError("stop", "stop strings must be non-empty")
        return list(stop)

    def _normalized_stop_token_ids(self) -> list[int]:
        ids = self.stop_token_ids
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise InvalidParameterError("stop_token_ids", f"must be a list of token ids, got {ids!r}")
        for token_id in ids:
            _check_int("stop_token_ids", token_id, Bounds(0))
        return list(ids)

    def validate_for_model(
        self,
        vocab_size: int,
        max_logprobs: int,
        max_n: int,
        max_stop_strings: int = MAX_STOP_STRINGS,
        max_stop_len: int = MAX_STOP_STRING_CHARS,
    ) -> None:
        """Checks the limits that depend on the model and the engine's caps."""
        for token_id in self.logit_bias or ():
            if token_id >= vocab_size:
                raise InvalidParameterError(
                    "logit_bias", f"token id {token_id} is outside the vocabulary [0, {vocab_size})"
                )
        for token_id in self.stop_token_ids:
            if token_id >= vocab_size:
                raise InvalidParameterError(
                    "stop_token_ids", f"token id {token_id} is outside the vocabulary [0, {vocab_size})"
                )
        if self.logprobs is not None and self.logprobs > max_logprobs:
            raise InvalidParameterError(
                "logprobs", f"must be <= {max_logprobs} (the server's max_logprobs), got {self.logprobs}"
            )
        if self.n > max_n:
            raise InvalidParameterError("n", f"must be <= {max_n} (the server's max_n), got {self.n}")
        if len(self.stop) > max_stop_strings:
            raise InvalidParameterError(
                "stop", f"at most {max_stop_strings} stop strings are allowed, got {len(self.stop)}"
            )
        for item in self.stop:
            if len(item) > max_stop_len:
                raise InvalidParameterError(
                    "stop", f"stop strings must be at most {max_stop_len} characters, got {len(item)}"
                )

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to the argmax (temperature 0, or top_k 1)."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1
