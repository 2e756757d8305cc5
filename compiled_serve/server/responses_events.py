"""Output items and streamed events of the Responses API, built from parsed output deltas.

One builder serves both modes: streamed, each `OutputDelta` becomes events; not streamed, the
one delta of the whole output is fed in and only the finished items are kept. Items open in
the order the output has them (reasoning, then the message, then each function call); a new
kind of output closes the open item:

  response.created, response.in_progress
  response.output_item.added                       (reasoning | message | function_call)
    response.content_part.added                    (reasoning_text | output_text part)
    response.reasoning_text.delta / response.output_text.delta ...
    response.function_call_arguments.delta ...     (function calls: never text deltas)
    ...done events, response.output_item.done
  response.completed | response.incomplete (max_output_tokens)
"""

from __future__ import annotations

import uuid
from typing import Any

from compiled_serve.server.output_parsing import OutputDelta
from compiled_serve.server.streaming import dumps


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseEvents:
    def __init__(self, response: dict[str, Any]):
        self.response = response  # the response object; its "output" fills as items close
        self._sequence = 0
        self._open: dict[str, Any] | None = None  # the item being written
        self._calls: dict[int, dict[str, Any]] = {}  # call index -> its function_call item

    def event(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, "sequence_number": self._sequence} | fields
        self._sequence += 1
        return f"event: {kind}\ndata: {dumps(body)}\n\n"

    def start(self) -> list[str]:
        return [self.event("response.created", response=self.response),
                self.event("response.in_progress", response=self.response)]

    def _open_item(self, item: dict[str, Any]) -> list[str]:
        events = self._close()
        self._open = item
        events.append(self.event("response.output_item.added", output_index=len(self.response["output"]),
                                 item=item | {"status": "in_progress"}))
        return events

    def _text_delta(self, kind: str, part_type: str, text: str) -> list[str]:
        events: list[str] = []
        if self._open is None or self._open["type"] != kind:
            item = ({"type": "reasoning", "id": _id("rs"), "summary": [], "content": []} if kind == "reasoning" else
                    {"type": "message", "id": _id("msg"), "role": "assistant", "content": []})
            events += self._open_item(item)
            part = {"type": part_type, "text": ""} | ({"annotations": [], "logprobs": []} if kind == "message" else {})
            events.append(self.event("response.content_part.added", item_id=item["id"], output_index=self._index,
                                     content_index=0, part=part))
            item["content"].append(part)
        self._open["content"][0]["text"] += text
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        events.append(self.event(name, item_id=self._open["id"], output_index=self._index, content_index=0,
                                 delta=text, **extra))
        return events

    @property
    def _index(self) -> int:
        return len(self.response["output"])

    def add(self, delta: OutputDelta) -> list[str]:
        events: list[str] = []
        if delta.reasoning:
            events += self._text_delta("reasoning", "reasoning_text", delta.reasoning)
        if delta.content:
            events += self._text_delta("message", "output_text", delta.content)
        for call in delta.tool_calls:
            if call.id is not None:
                item = {"type": "function_call", "id": _id("fc"), "call_id": call.id, "name": call.name,
                        "arguments": ""}
                events += self._open_item(item)
                self._calls[call.index] = item
            item = self._calls[call.index]
            if call.arguments and item is self._open:
                item["arguments"] += call.arguments
                events.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                         output_index=self._index, delta=call.arguments))
        return events

    def _close(self, status: str = "completed") -> list[str]:
        item, self._open = self._open, None
        if item is None:
            return []
        index, events = self._index, []
        if item["type"] == "function_call":
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                     name=item["name"], arguments=item["arguments"]))
        else:
            part = item["content"][0]
            name = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            extra = {"logprobs": []} if item["type"] == "message" else {}
            events.append(self.event(name, item_id=item["id"], output_index=index, content_index=0,
                                     text=part["text"], **extra))
            events.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                     content_index=0, part=part))
        item["status"] = status
        self.response["output"].append(item)
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events

    def finish(self, incomplete: bool, usage: dict[str, Any]) -> list[str]:
        """`incomplete`: max_output_tokens cut the output, and with it the item being written."""
        events = self._close("incomplete" if incomplete else "completed")
        self.response.update(status="incomplete" if incomplete else "completed", usage=usage,
                             incomplete_details={"reason": "max_output_tokens"} if incomplete else None)
        events.append(self.event("response.incomplete" if incomplete else "response.completed",
                                 response=self.response))
        return events

    def fail(self, message: str, code: str) -> list[str]:
        self.response.update(status="failed", error={"code": code, "message": message})
        return [self.event("response.failed", response=self.response)]
