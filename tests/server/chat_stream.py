"""A streamed chat completion joined back together, as a client that reads every delta sees it."""

from __future__ import annotations

from typing import Any

import openai


def streamed_chat(client: openai.OpenAI, **kwargs: Any) -> tuple[str, list[tuple[str, str, str]], str | None]:
    """(content, [(id, name, arguments)] joined from the deltas, finish_reason) of choice 0; checks
    that each call's first delta carries its id and name, and later ones neither."""
    content, finish, calls = "", None, {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                if call.index not in calls:
                    assert call.id and call.function.name, "a call's first delta carries its id and name"
                    calls[call.index] = [call.id, call.function.name, ""]
                else:
                    assert call.id is None and call.function.name is None, "id and name are sent once"
                calls[call.index][2] += call.function.arguments or ""
    return content, [tuple(calls[i]) for i in sorted(calls)], finish
