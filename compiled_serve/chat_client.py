"""`compiled-serve chat --url URL`: the terminal chat against a running OpenAI-compatible server.

The conversation goes to `POST {URL}/v1/chat/completions` with `stream: true`; each server-sent
event's `choices[0].delta.content` is printed as it arrives. The model is `--model` when given,
otherwise the first one `GET /v1/models` lists. Any OpenAI-compatible server works (ours, vLLM,
Ollama's /v1), and the loop, its commands and Ctrl-C are the in-process chat's (chat_repl.py).
"""

from __future__ import annotations

import json
from typing import Any, TextIO

from compiled_serve.chat_repl import run_conversation


class ChatServerError(Exception):
    """The server could not be reached, or refused a request: what to tell the user."""


def api_base(url: str) -> str:
    """`http://host:8000`, `http://host:8000/` and `http://host:8000/v1` all name the same API."""
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def _error_text(response: Any) -> str:
    response.read()
    try:
        error = response.json().get("error", {})
        return error.get("message") or response.text
    except (ValueError, AttributeError):
        return response.text


class RemoteChat:
    """Streams chat completions from one server; `reply` has chat_repl's replier signature."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None,
                 max_tokens: int | None = None, temperature: float | None = None, timeout_s: float = 600):
        import httpx

        self.base = api_base(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s, connect=10))
        self.sampling = {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature)) if v is not None}
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        import httpx

        try:
            response = self.client.get(f"{self.base}/models")
        except httpx.HTTPError as exc:
            raise ChatServerError(f"cannot reach {self.base}: {exc}") from exc
        if response.status_code != 200:
            raise ChatServerError(f"GET {self.base}/models: {response.status_code} {_error_text(response)}")
        models = response.json().get("data") or []
        if not models:
            raise ChatServerError(f"{self.base}/models lists no model; name one with --model")
        return str(models[0]["id"])

    def reply(self, request_id: str, messages: list[dict], out: TextIO) -> str:
        """Streams one reply to `out` and returns it; Ctrl-C closes the stream, keeping what came."""
        import httpx

        body = {"model": self.model, "messages": messages, "stream": True, **self.sampling}
        text = ""
        try:
            with self.client.stream("POST", f"{self.base}/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise ChatServerError(f"the server refused the request ({response.status_code}): "
                                          f"{_error_text(response)}")
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:  # e.g. the server is shutting down mid-reply
                        raise ChatServerError(f"the server ended the reply: {event['error'].get('message')}")
                    for choice in event.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") or ""
                        out.write(piece)
                        out.flush()
                        text += piece
        except KeyboardInterrupt:  # stop this reply (the stream closes), keep the conversation
            pass
        except httpx.HTTPError as exc:
            raise ChatServerError(f"lost {self.base}: {exc}") from exc
        out.write("\n")
        out.flush()
        return text

    def close(self) -> None:
        self.client.close()


def run_remote_chat(url: str, stdin: TextIO, stdout: TextIO, stderr: TextIO, model: str | None = None,
                    api_key: str | None = None, max_tokens: int | None = None, temperature: float | None = None,
                    system: str | None = None, interactive: bool = False) -> int:
    """The chat loop against `url`: 0 at /exit or end of input, 1 when the server fails."""
    try:
        chat = RemoteChat(url, model=model, api_key=api_key, max_tokens=max_tokens, temperature=temperature)
    except ChatServerError as exc:
        stderr.write(f"compiled-serve chat: error: {exc}\n")
        return 1
    try:
        if interactive:
            stdout.write(f"connected to {chat.base} (model {chat.model})\n")
        return run_conversation(chat.reply, stdin, stdout, system=system, interactive=interactive)
    except ChatServerError as exc:
        stdout.write("\n")
        stderr.write(f"compiled-serve chat: error: {exc}\n")
        return 1
    finally:
        chat.close()
