"""Agent frameworks against the real server: the openai-agents SDK through the Responses API,
and LangChain's ChatOpenAI (`bind_tools`, `with_structured_output`) through chat completions.
Each skips when its package is not installed (`pip install openai-agents langchain-openai`)."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from live_server import generation_server

pytestmark = pytest.mark.heavy
MODEL = "SmolLM2-135M-Instruct"
CALLS: list[str] = []


@pytest.fixture(scope="module")
def live(engine):
    yield from generation_server(engine)


def test_openai_agents_sdk_runs_a_tool_through_the_responses_api(live) -> None:
    agents = pytest.importorskip("agents")
    import openai

    agents.set_tracing_disabled(True)  # tracing would upload to OpenAI

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        CALLS.append(city)
        return f"It is sunny in {city}."

    client = openai.AsyncOpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0)
    agent = agents.Agent(name="weather", instructions="Use the tool to answer.", tools=[get_weather],
                         model=agents.OpenAIResponsesModel(model=MODEL, openai_client=client),
                         model_settings=agents.ModelSettings(tool_choice="required", max_tokens=48, temperature=0))
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?", max_turns=3))
    assert CALLS, "the forced call reached the tool"
    kinds = [item.type for item in result.new_items]
    assert "tool_call_item" in kinds and "tool_call_output_item" in kinds
    assert isinstance(result.final_output, str)


def test_langchain_bind_tools_and_structured_output(live) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """Weather of a city."""

        city: str = Field(max_length=20)
        celsius: int = Field(ge=-50, le=60)

    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=live.base_url + "/v1", api_key="unused",
                                      temperature=1.0, max_tokens=128, max_retries=0)
    bound = llm.bind_tools([Weather], tool_choice="required")
    message = bound.invoke("Weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "Weather"
    jsonschema.validate(message.tool_calls[0]["args"], Weather.model_json_schema())
    for method in ("function_calling", "json_schema"):
        answer = llm.with_structured_output(Weather, method=method).invoke("Weather in Paris?")
        assert isinstance(answer, Weather), method
        json.dumps(answer.model_dump())
