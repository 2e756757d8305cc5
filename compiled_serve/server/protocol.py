"""OpenAI-compatible request bodies.

Every field is bounded, so the published OpenAPI schema describes what the server accepts
(schemathesis generates from it). A sampling field's range is the one `SamplingParams` enforces
(its `*_BOUNDS` constants are the single source of truth); the HTTP-only caps here (MAX_N,
MAX_LOGPROBS, prompt sizes) are outer limits, and the engine's configured caps (max_n,
max_logprobs, max_model_len, vocabulary) are checked per request.
Every field of OpenAI's chat-completions and completions requests is declared: the ones this
server does not act on are accepted and logged once (request_fields.IGNORED), and the ones asking
for what a text model cannot do are a 400 saying so (request_fields.refuse_unsupported_*). A
field OpenAI documents as nullable may be null, meaning its default. Any other field is rejected
(a typo is not silently ignored); NaN and Inf never validate; types are strict (no "1" -> 1, no
true -> 1).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compiled_serve.sampling_params import (
    FREQUENCY_PENALTY_BOUNDS,
    LOGIT_BIAS_BOUNDS,
    LOGPROBS_BOUNDS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKENS_BOUNDS,
    MIN_P_BOUNDS,
    MIN_TOKENS_BOUNDS,
    N_BOUNDS,
    PRESENCE_PENALTY_BOUNDS,
    REPETITION_PENALTY_BOUNDS,
    SEED_BOUNDS,
    TEMPERATURE_BOUNDS,
    TOP_K_BOUNDS,
    TOP_P_BOUNDS,
    Bounds,
)

MAX_PROMPT_CHARS = 1_000_000
MAX_BATCH_PROMPTS = 64
MAX_PROMPT_TOKENS = 131_072
MAX_TOKEN_ID = 2**31 - 1
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 1024
MAX_N = 128
MAX_LOGPROBS = 100
MAX_MESSAGES = 1024
MAX_TEMPLATE_CHARS = 65_536
MAX_EMBEDDING_INPUTS = 256

TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_PROMPT_TOKENS)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
ModelName = Annotated[str, Field(max_length=256)]


def within(bounds: Bounds, **http_caps: int) -> Any:
    """A pydantic Field for `bounds` (SamplingParams' limit), plus HTTP-only caps such as le=MAX_N."""
    return Field(**(bounds.pydantic_kwargs() | http_caps))


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False
    include_obfuscation: bool | None = None  # OpenAI pads SSE events against side channels; ignored


def _null_means_default(model: type[BaseModel], data: Any) -> Any:
    """OpenAI's request types mark most fields Optional: a client may send `"n": null` for the
    default. Drops those nulls so each field keeps one non-null type and one default."""
    if not isinstance(data, dict):
        return data
    return {name: value for name, value in data.items()
            if value is not None or name not in model.model_fields or model.model_fields[name].default is None}


class JsonSchemaFormat(StrictModel):
    name: Annotated[str, Field(max_length=64)] = "response"
    description: Annotated[str, Field(max_length=4096)] | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True, populate_by_name=True)


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsFields(StrictModel):
    """vLLM's `structured_outputs` body field (compiled_serve.structured.StructuredOutputsParams)."""

    # `json` shadows a BaseModel method, hence the alias.
    json_spec: dict[str, Any] | Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS)] | None = Field(
        default=None, alias="json")
    regex: Annotated[str, Field(max_length=4096)] | None = None
    choice: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(min_length=1, max_length=256)] | None = None
    grammar: Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS)] | None = None
    json_object: bool | None = None

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True, populate_by_name=True)


class SamplingFields(StrictModel):
    """Fields shared by completions and chat completions (OpenAI + vLLM-style extras)."""

    model: ModelName | None = None
    n: Annotated[int, within(N_BOUNDS, le=MAX_N)] = 1
    best_of: Annotated[int, within(N_BOUNDS, le=MAX_N)] | None = None
    max_tokens: Annotated[int, within(MAX_TOKENS_BOUNDS, le=MAX_PROMPT_TOKENS)] | None = None
    temperature: Annotated[float, within(TEMPERATURE_BOUNDS)] | None = None
    top_p: Annotated[float, within(TOP_P_BOUNDS)] | None = None
    presence_penalty: Annotated[float, within(PRESENCE_PENALTY_BOUNDS)] | None = None
    frequency_penalty: Annotated[float, within(FREQUENCY_PENALTY_BOUNDS)] | None = None
    logit_bias: Annotated[dict[str, Annotated[float, within(LOGIT_BIAS_BOUNDS)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    seed: Annotated[int, within(SEED_BOUNDS)] | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # Extras (vLLM names).
    top_k: Annotated[int, within(TOP_K_BOUNDS)] | None = None
    min_p: Annotated[float, within(MIN_P_BOUNDS)] | None = None
    repetition_penalty: Annotated[float, within(REPETITION_PENALTY_BOUNDS)] | None = None
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    min_tokens: Annotated[int, within(MIN_TOKENS_BOUNDS, le=MAX_PROMPT_TOKENS)] = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Structured output: compiled at request time (see structured.py).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsFields | None = None
    guided_json: dict[str, Any] | Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS)] | None = None
    guided_regex: Annotated[str, Field(max_length=4096)] | None = None
    guided_choice: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(min_length=1, max_length=256)] | None = None
    guided_grammar: Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        return _null_means_default(cls, data)

    @field_validator("logit_bias")
    @classmethod
    def _integer_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            for key in value:
                if not key.lstrip("-").isdecimal() or not key.isascii():
                    raise ValueError(f"logit_bias keys must be token ids (integers), got {key[:32]!r}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    # Optional in OpenAI's type too; a missing or null prompt is a 400 saying what a prompt is.
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_BATCH_PROMPTS)] | \
        TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_BATCH_PROMPTS)] | None = None
    echo: bool = False
    logprobs: Annotated[int, within(LOGPROBS_BOUNDS, le=MAX_LOGPROBS)] | None = None
    suffix: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None


# A payload this server ignores or refuses whatever it holds, so it is not validated field by field.
OpaquePayload = Annotated[dict[str, Any], Field(max_length=16)]


class ContentPartBase(StrictModel):
    # OpenAI's explicit prompt-cache marks; ignored (prefix caching here is automatic).
    prompt_cache_breakpoint: OpaquePayload | None = None


class TextContentPart(ContentPartBase):
    type: Literal["text"]
    text: PromptText


# The other parts of OpenAI's content union. A text model refuses image, audio and file parts
# (request_fields.refuse_unsupported_chat) with a 400 that says what it is, malformed or not.
class ImageContentPart(ContentPartBase):
    type: Literal["image_url"]
    image_url: OpaquePayload


class AudioContentPart(ContentPartBase):
    type: Literal["input_audio"]
    input_audio: OpaquePayload


class FileContentPart(ContentPartBase):
    type: Literal["file"]
    file: OpaquePayload


class RefusalContentPart(ContentPartBase):
    """An assistant turn's refusal, sent back by the client: rendered as the assistant's text."""

    type: Literal["refusal"]
    refusal: PromptText


ContentPart = Annotated[TextContentPart | ImageContentPart | AudioContentPart | FileContentPart |
                        RefusalContentPart, Field(discriminator="type")]


MAX_TOOLS = 128
MAX_TOOL_CALLS = 128
FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


class FunctionDefinition(StrictModel):
    name: FunctionName
    description: Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS)] | None = None
    # Checked against the JSON-Schema metaschema at request time (tool_choice.py): 400 if not one.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class CustomTool(StrictModel):
    """OpenAI's free-form (grammar or text input) tool: refused, only function tools are served."""

    type: Literal["custom"]
    custom: OpaquePayload


class NamedFunction(StrictModel):
    name: FunctionName


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class AllowedTools(StrictModel):
    mode: Literal["auto", "required"]
    tools: Annotated[list[NamedToolChoice], Field(max_length=MAX_TOOLS)]


class AllowedToolsChoice(StrictModel):
    """A subset of `tools` with a mode: resolved into tools + tool_choice (request_fields)."""

    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class CustomToolChoice(StrictModel):
    type: Literal["custom"]
    custom: OpaquePayload


ToolChoiceObject = Annotated[NamedToolChoice | AllowedToolsChoice | CustomToolChoice, Field(discriminator="type")]


class ToolCallFunction(StrictModel):
    name: Annotated[str, Field(max_length=256)]
    arguments: PromptText


class MessageToolCall(StrictModel):
    id: Annotated[str, Field(max_length=256)]
    type: Literal["function"] = "function"
    function: ToolCallFunction


class CustomMessageToolCall(StrictModel):
    """A call of a custom (free-form input) tool: refused like the tool (request_fields)."""

    id: Annotated[str, Field(max_length=256)]
    type: Literal["custom"]
    custom: OpaquePayload


class ChatMessage(StrictModel):
    # "function": OpenAI's deprecated function-calling result turn, refused (request_fields).
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: PromptText | Annotated[list[ContentPart], Field(max_length=256)] | None = None
    name: Annotated[str, Field(max_length=256)] | None = None
    tool_call_id: Annotated[str, Field(max_length=256)] | None = None
    # Not a discriminated union: `type` may be left out of a function call.
    tool_calls: Annotated[list[MessageToolCall | CustomMessageToolCall], Field(max_length=MAX_TOOL_CALLS)] | None = None
    # What this server returned earlier; clients send it back, and it is not rendered.
    reasoning_content: PromptText | None = None
    # Assistant-turn fields of OpenAI's message type: `refusal` is rendered as the turn's text when
    # it has no content; `audio` (a reference to earlier audio output) is ignored; `function_call`
    # (deprecated) is refused.
    refusal: PromptText | None = None
    audio: OpaquePayload | None = None
    function_call: OpaquePayload | None = None

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if isinstance(part, TextContentPart):
                parts.append(part.text)
            elif isinstance(part, RefusalContentPart):
                parts.append(part.refusal)
        return "".join(parts)


class ChatTemplateFields(StrictModel):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS)] | None = None
    chat_template_kwargs: Annotated[dict[str, Any], Field(max_length=32)] | None = None

    @model_validator(mode="after")
    def _generation_prompt_xor_continue(self) -> ChatTemplateFields:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs the last message to be from the assistant")
        return self


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    logprobs: bool = False
    top_logprobs: Annotated[int, within(LOGPROBS_BOUNDS, le=MAX_LOGPROBS)] | None = None
    max_completion_tokens: Annotated[int, within(MAX_TOKENS_BOUNDS, le=MAX_PROMPT_TOKENS)] | None = None
    # A CustomTool or CustomToolChoice is refused before the tool plan is made (request_fields).
    tools: Annotated[list[Annotated[ChatTool | CustomTool, Field(discriminator="type")]],
                     Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI fields accepted and not acted on (request_fields.IGNORED says why; each is logged once).
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None
    store: bool | None = None
    service_tier: Annotated[str, Field(max_length=32)] | None = None
    prediction: OpaquePayload | None = None
    prompt_cache_key: Annotated[str, Field(max_length=1024)] | None = None
    prompt_cache_options: OpaquePayload | None = None
    prompt_cache_retention: Annotated[str, Field(max_length=32)] | None = None
    reasoning_effort: Annotated[str, Field(max_length=32)] | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    verbosity: Annotated[str, Field(max_length=32)] | None = None
    # OpenAI fields asking for what a text model cannot do: a 400 that says so (request_fields).
    modalities: Annotated[list[Literal["text", "audio"]], Field(max_length=2)] | None = None
    audio: OpaquePayload | None = None
    functions: Annotated[list[OpaquePayload], Field(max_length=MAX_TOOLS)] | None = None
    function_call: Annotated[str, Field(max_length=64)] | OpaquePayload | None = None
    web_search_options: OpaquePayload | None = None
    moderation: OpaquePayload | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class EmbeddingRequest(StrictModel):
    model: ModelName | None = None
    input: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | \
        Annotated[list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]],
                  Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)] | \
        Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_TOKENS)] | \
        Annotated[list[Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_TOKENS)]],
                  Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=65_536)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None


class TokenizeRequest(StrictModel):
    """Either `prompt` (plain text) or `messages` (rendered through the chat template)."""

    model: ModelName | None = None
    prompt: PromptText | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _exactly_one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(StrictModel):
    model: ModelName | None = None
    tokens: Annotated[list[TokenId], Field(max_length=MAX_PROMPT_TOKENS)]
