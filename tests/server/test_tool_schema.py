"""The forced-call schema (tool_choice required / named) checked with jsonschema, tool checks,
and the default tools-in-the-system-turn prompt rendered through the SmolLM2 template."""

from __future__ import annotations

import jsonschema
import pytest

from compiled_serve.chat_template import render_chat
from compiled_serve.errors import InvalidParameterError
from compiled_serve.server.tool_choice import forced_call_schema, function_tool
from compiled_serve.tool_prompt import default_tool_conversation, template_supports_tools

CITY = function_tool("city", None, {"type": "object", "properties": {"name": {"$ref": "#/$defs/Name"}},
                                    "required": ["name"], "$defs": {"Name": {"type": "string", "maxLength": 5}}},
                     "tools[0]")
NOTHING = function_tool("nothing", None, None, "tools[1]")
SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                    "{% endif %}")


def _valid(schema: dict, value: object) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def test_forced_schema_accepts_exactly_valid_calls() -> None:
    schema = forced_call_schema([CITY, NOTHING], parallel=True)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert _valid(schema, [{"name": "city", "arguments": {"name": "Oslo"}}, {"name": "nothing", "arguments": {}}])
    assert not _valid(schema, [])
    assert not _valid(schema, [{"name": "city", "arguments": {"name": "Amsterdam"}}])  # $ref'd maxLength
    assert not _valid(schema, [{"name": "town", "arguments": {}}])
    assert not _valid(schema, [{"name": "city", "arguments": {}}])  # required
    assert not _valid(schema, [{"name": "nothing", "arguments": [], "extra": 1}])
    single = forced_call_schema([CITY, NOTHING], parallel=False)
    assert not _valid(single, [{"name": "nothing", "arguments": {}}] * 2)


def test_tools_defining_one_name_differently_cannot_be_forced() -> None:
    other = function_tool("other", None, {"type": "object", "$defs": {"Name": {"type": "integer"}}}, "tools[1]")
    with pytest.raises(InvalidParameterError) as caught:
        forced_call_schema([CITY, other], parallel=True)
    assert caught.value.field == "tools"


@pytest.mark.parametrize("parameters", [{"type": "object", "properties": 5}, {"type": "string"}, {"required": "x"}])
def test_parameters_that_are_not_an_object_schema_are_refused(parameters: dict) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        function_tool("f", None, parameters, "tools[0].function.parameters")
    assert caught.value.field == "tools[0].function.parameters"


def test_default_tool_prompt_through_a_template_without_tools() -> None:
    assert not template_supports_tools(SMOLLM2_TEMPLATE)
    conversation = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "city", "arguments": '{"name": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "warm"},
    ]
    text = render_chat(default_tool_conversation(conversation, [CITY.as_chat_tool()]), SMOLLM2_TEMPLATE,
                       add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "city", "parameters": ' in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "city", "arguments": {"name": "Oslo"}}\n</tool_call>'
            '<|im_end|>') in text
    assert ("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwarm\n</tool_response>"
            "<|im_end|>") in text
    assert text.endswith("<|im_start|>assistant\n")
