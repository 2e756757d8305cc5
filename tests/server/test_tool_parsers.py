"""Tool-call and reasoning parsers on crafted transcripts: the final parse against hand-written
expectations (arguments compared as decoded JSON), and the streamed deltas, for the text cut at
every split point and fed one character at a time, joining into exactly the final parse."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from compiled_serve.server.output_parsing import ChoiceParser, OutputParsers, parse_output
from compiled_serve.server.reasoning import REASONING_PARSERS
from compiled_serve.server.tool_parsers import TOOL_PARSERS, ForcedCallParser
from compiled_serve.server.tool_parsers.json_scan import json_prefix_length

WEATHER = '{"city": "Paris", "unit": "celsius", "days": [1, 2], "note": "a \\"quoted\\" }"}'

# (parser, reasoning parser, text, expected reasoning, expected content, expected calls)
CASES: list[tuple[str, str | None, str, str | None, str, list[tuple[str, Any]]]] = [
    ("hermes", None, "Just text, no calls.", None, "Just text, no calls.", []),
    ("hermes", None, f'<tool_call>\n{{"name": "weather", "arguments": {WEATHER}}}\n</tool_call>',
     None, "", [("weather", json.loads(WEATHER))]),
    ("hermes", None, 'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
     '<tool_call>\n{"arguments": {"y": -2.5e3}, "name": "b"}\n</tool_call>',
     None, "Let me check.\n", [("a", {"x": 1}), ("b", {"y": -2.5e3})]),
    ("hermes", None, '<tool_call>{"name": "a", "arguments": {"x": 1}}', None, "", [("a", {"x": 1})]),
    ("hermes", None, '<tool_call>{"name": "q", "arguments": "{\\"k\\": [true, null]}"}</tool_call>',
     None, "", [("q", {"k": [True, None]})]),
    # A text that ends inside a call (EOS or a stop string mid-object): the call as far as written,
    # as a stream has already announced it.
    ("hermes", None, '<tool_call>{"name": "a", "arguments": {"x": 1}', None, "", [("a", {"x": 1})]),
    # Not calls: the whole text is content.
    ("hermes", None, "I use <tool_call> tags like <tool_call>this</tool_call>.", None,
     "I use <tool_call> tags like <tool_call>this</tool_call>.", []),
    ("llama3_json", None, '{"name": "weather", "parameters": {"city": "Oslo"}}', None, "",
     [("weather", {"city": "Oslo"})]),
    ("llama3_json", None, '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"z": "é"}}',
     None, "", [("a", {}), ("b", {"z": "é"})]),
    ("llama3_json", None, '{"answer": 42}', None, '{"answer": 42}', []),
    ("llama3_json", None, "  Plain words.", None, "  Plain words.", []),
    ("mistral", None, 'Sure. [TOOL_CALLS][{"name": "a", "arguments": {"n": 10}}, {"name": "b", "arguments": {}}]',
     None, "Sure. ", [("a", {"n": 10}), ("b", {})]),
    ("mistral", None, "[TOOL_CALLS] oops", None, "[TOOL_CALLS] oops", []),
    ("forced", None, '[{"name": "a", "arguments": {"n": 1}}, {"name": "b", "arguments": {"s": "]"}}]',
     None, "", [("a", {"n": 1}), ("b", {"s": "]"})]),
    # Reasoning first; the tool parser sees only the content.
    ("hermes", "qwen3", '<think>Should I call <tool_call>? Yes.</think>\n<tool_call>\n{"name": "a", '
     '"arguments": {"x": 1}}\n</tool_call>', "Should I call <tool_call>? Yes.", "\n", [("a", {"x": 1})]),
    ("hermes", "qwen3", "No thinking here </think> at all.", None, "No thinking here </think> at all.", []),
    ("hermes", "qwen3", "<think>cut off while thin", "cut off while thin", "", []),
    (None, "deepseek_r1", "reasoning first</think>The answer.", "reasoning first", "The answer.", []),
    (None, "deepseek_r1", "<think>opened again</think>", "opened again", "", []),
    (None, "deepseek_r1", "never closed <", "never closed <", "", []),
]


def _parsers(tool: str | None, reasoning: str | None) -> OutputParsers:
    tools = ForcedCallParser() if tool == "forced" else TOOL_PARSERS[tool]() if tool else None
    return OutputParsers(REASONING_PARSERS[reasoning] if reasoning else None, tools)


def _ids() -> Any:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def _joined(parsers: OutputParsers, prefixes: list[str], text: str) -> dict[str, Any]:
    parser = ChoiceParser(parsers, _ids())
    reasoning, content, calls = "", "", {}
    for delta in [parser.update(p) for p in prefixes] + [parser.finish(text)]:
        reasoning += delta.reasoning
        content += delta.content
        for call in delta.tool_calls:
            if call.index not in calls:
                assert call.id is not None and call.name is not None, "a call's first delta carries id and name"
                assert call.index == len(calls), "calls appear in order"
                calls[call.index] = {"id": call.id, "name": call.name, "arguments": ""}
            else:
                assert call.id is None and call.name is None, "id and name are sent once"
            calls[call.index]["arguments"] += call.arguments
    return {"reasoning": reasoning, "content": content, "calls": [calls[i] for i in sorted(calls)]}


def _final(parsers: OutputParsers, text: str) -> dict[str, Any]:
    parsed = parse_output(parsers, text, _ids())
    return {"reasoning": parsed.reasoning or "", "content": parsed.content,
            "calls": [{"id": i, "name": c.name, "arguments": c.arguments} for i, c in zip(parsed.call_ids, parsed.calls)]}


@pytest.mark.parametrize("tool, reasoning, text, want_reasoning, want_content, want_calls", CASES)
def test_final_parse(tool: str | None, reasoning: str | None, text: str, want_reasoning: str | None,
                     want_content: str, want_calls: list[tuple[str, Any]]) -> None:
    parsed = parse_output(_parsers(tool, reasoning), text)
    assert parsed.reasoning == want_reasoning
    assert parsed.content == want_content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == want_calls
    assert len(set(parsed.call_ids)) == len(parsed.calls)


@pytest.mark.parametrize("tool, reasoning, text", [case[:3] for case in CASES])
def test_stream_joins_into_final_at_every_split(tool: str | None, reasoning: str | None, text: str) -> None:
    parsers = _parsers(tool, reasoning)
    want = _final(parsers, text)
    prefix_lists = [[text[:i] for i in range(len(text) + 1)]] + [[text[:cut]] for cut in range(len(text) + 1)]
    for prefixes in prefix_lists:
        joined = _joined(parsers, prefixes, text)
        assert joined == want, f"fed {prefixes[-1]!r} before the end"


def test_arguments_stream_in_fragments_after_the_name() -> None:
    text = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    parser = ChoiceParser(OutputParsers(tools=TOOL_PARSERS["hermes"]()), _ids())
    deltas = [parser.update(text[:i]) for i in range(len(text) + 1)] + [parser.finish(text)]
    calls = [call for d in deltas for call in d.tool_calls]
    assert calls[0].name == "weather" and calls[0].id == "call_0"
    assert len(calls) > 5, "arguments arrive as they are generated, not at the end"
    assert all(not d.content for d in deltas), "no marker text leaks into the content"


def test_content_is_never_sent_before_it_is_known_not_to_open_a_call() -> None:
    parser = ChoiceParser(OutputParsers(tools=TOOL_PARSERS["hermes"]()), _ids())
    assert parser.update("Hi <tool_ca").content == "Hi "
    assert parser.update("Hi <tool_cab").content == "<tool_cab"


def test_parsers_never_evaluate_model_output() -> None:
    """Python literals are not JSON: a parser that used eval/ast would accept these. The strict
    parse finds no call; a stream has announced the last two (name and `{"x": ` were JSON), so the
    endpoints' answer keeps them, with the arguments only as far as they are JSON."""
    texts = ["<tool_call>{'name': 'a', 'arguments': {}}</tool_call>",
             '<tool_call>{"name": "a", "arguments": {"x": __import__("os")}}</tool_call>',
             '<tool_call>{"name": "a", "arguments": {"x": True}}</tool_call>']
    parsers = _parsers("hermes", None)
    for text in texts:
        assert parsers.tools.parse(text).calls == []
        assert _joined(parsers, [text[:i] for i in range(len(text) + 1)], text) == _final(parsers, text)
    assert parse_output(parsers, texts[0]).calls == []
    for text in texts[1:]:
        assert [(c.name, c.arguments) for c in parse_output(parsers, text).calls] == [("a", '{"x": ')]


def test_json_prefix_length() -> None:
    """How far a text is JSON: every prefix of a valid value entirely, stopping at a value's end
    or at the first character no JSON could have there."""
    for doc in [WEATHER, "{}", "[]", '{"a": [true, false, null, -1.5e+3, 0, {"b": "\\u00e9\\n"}]}',
                '{ "a" : { } }', '{"y": -2.5e3}']:
        json.loads(doc)
        assert all(json_prefix_length(doc[:k], 0) == k for k in range(len(doc) + 1)), doc
        assert json_prefix_length(doc + "}\n</tool_call>", 0) == len(doc)
    for doc, good in [('{"x": True}', 6), ('{"x": 01}', 7), ("{'a': 1}", 1), ('{"x": 1.e5}', 8),
                      ('{"a" 1}', 5), ('{"a": "b\x01"}', 8), ('{"a": tru}', 9), ("[1,]", 3), ('{"a":1,}', 7),
                      ('{"a": "\\q"}', 7)]:
        assert json_prefix_length(doc, 0) == good, doc


# (parser, full transcript, content before the calls): each call's name precedes its arguments.
CUT_TRANSCRIPTS = [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n</tool_call>\n'
     '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>', "Sure.\n"),
    ("llama3_json", '{"name": "weather", "parameters": {"city": "Oslo"}}; {"name": "b", "parameters": {"z": 10}}', ""),
    ("mistral", 'Ok [TOOL_CALLS][{"name": "a", "arguments": {"n": 10}}, {"name": "b", "arguments": {}}]', "Ok "),
    ("forced", '[{"name": "a", "arguments": {"n": 1}}, {"name": "b", "arguments": {"s": "]"}}]', ""),
]


def _argument_spans(text: str) -> list[tuple[str, int, int]]:
    """(name, start, end) of each call's arguments object in a well-formed transcript."""
    spans, decoder, pos = [], json.JSONDecoder(), 0
    while (at := text.find('"name": "', pos)) >= 0:
        name = text[at + 9: text.index('"', at + 9)]
        start = text.index("{", text.index("arguments" if '"arguments"' in text else "parameters", at))
        end = decoder.raw_decode(text, start)[1]
        spans.append((name, start, end))
        pos = end
    return spans


@pytest.mark.parametrize("tool, text, before", CUT_TRANSCRIPTS)
def test_a_call_cut_anywhere_is_the_same_streamed_and_not(tool: str, text: str, before: str) -> None:
    """The text ends at every point, whatever ended it (the token budget, EOS or a stop string
    mid-object: the endpoints read all of them alike): the streamed deltas join into the
    non-streamed parse, and both are the calls as far as they were written (the last one's
    arguments a prefix of the uncut text's), or, before any call's arguments start, the whole
    text as content. (Before, a text ended by EOS mid-call was all content non-streamed, while
    the stream had already sent the call.)"""
    parsers = _parsers(tool, None)
    spans = _argument_spans(text)
    assert len(spans) == 2 and [(c.name, c.arguments) for c in parse_output(parsers, text).calls] == \
        [(name, text[start:end]) for name, start, end in spans]
    for cut in range(len(text) + 1):
        prefix = text[:cut]
        calls = [(name, prefix[start:end]) for name, start, end in spans if start < cut]
        want = {"reasoning": "", "content": before if calls else prefix,
                "calls": [{"id": f"call_{i}", "name": n, "arguments": a} for i, (n, a) in enumerate(calls)]}
        parsed = parse_output(parsers, prefix, _ids())
        final = {"reasoning": parsed.reasoning or "", "content": parsed.content,
                 "calls": [{"id": i, "name": c.name, "arguments": c.arguments}
                           for i, c in zip(parsed.call_ids, parsed.calls)]}
        assert final == want, f"cut at {prefix!r}"
        parser = ChoiceParser(parsers, _ids())
        deltas = [parser.update(prefix[:i]) for i in range(cut + 1)] + [parser.finish(prefix)]
        content = "".join(d.content for d in deltas)
        streamed: dict[int, dict[str, Any]] = {}
        for call in (c for d in deltas for c in d.tool_calls):
            entry = streamed.setdefault(call.index, {"id": call.id, "name": call.name, "arguments": ""})
            entry["arguments"] += call.arguments
        assert {"reasoning": "", "content": content, "calls": [streamed[i] for i in sorted(streamed)]} == want, \
            f"streamed, cut at {prefix!r}"
