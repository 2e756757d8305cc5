"""The body of `POST /v1/responses`. Input items, tools and tool_choice stay plain JSON here
and are checked one by one in responses_input.py, so each mistake is a 400 that names it.

Fields that only tune OpenAI's own service (include, reasoning, truncation "disabled",
prompt_cache_key, safety_identifier, service_tier, ...) are accepted and have no effect here;
ones that ask for something this server cannot do are a 400 (background, conversation)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from compiled_serve.sampling_params import MAX_TOKENS_BOUNDS, TEMPERATURE_BOUNDS, TOP_P_BOUNDS
from compiled_serve.server.protocol import (
    MAX_MESSAGES,
    MAX_PROMPT_TOKENS,
    MAX_TOOLS,
    ModelName,
    PromptText,
    StrictModel,
    within,
)

ShortText = Annotated[str, Field(max_length=512)]


class ResponsesRequest(StrictModel):
    model: ModelName | None = None
    input: PromptText | Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_MESSAGES)]
    instructions: PromptText | None = None
    max_output_tokens: Annotated[int, within(MAX_TOKENS_BOUNDS, le=MAX_PROMPT_TOKENS)] | None = None
    temperature: Annotated[float, within(TEMPERATURE_BOUNDS)] | None = None
    top_p: Annotated[float, within(TOP_P_BOUNDS)] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: Annotated[str, Field(max_length=256)] | None = None
    stream: bool = False
    store: bool = True
    metadata: Annotated[dict[str, ShortText], Field(max_length=16)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    text: dict[str, Any] | None = None
    # Accepted, no effect here.
    include: Annotated[list[ShortText], Field(max_length=16)] | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    prompt_cache_key: ShortText | None = None
    safety_identifier: ShortText | None = None
    service_tier: ShortText | None = None
    # Refused unless off.
    background: bool | None = None
    conversation: Any = None
