"""`compiled-serve chat [MODEL]`: a terminal chat with the in-process engine (`ollama run`, `vllm chat`).

Each line read is a user turn. The conversation so far goes through the model's chat template,
and the reply is printed as the engine produces it. Piped stdin works too:

    printf 'Hi\\nAnd in French?\\n' | compiled-serve chat --max-tokens 32

Commands: /reset (forget the conversation), /exit or end of input (quit). Ctrl-C stops a reply.
The loop (`run_conversation`) takes any replier; `chat --url` gives it a server's (chat_client.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, TextIO

from compiled_serve.errors import InvalidParameterError
from compiled_serve.sampling_params import SamplingParams

_EXIT = ("/exit", "/quit", "/bye")

# (request id, the conversation so far, where to stream the reply) -> the whole reply
Replier = Callable[[str, list[dict], TextIO], str]


def chat_prompt_ids(engine: Any, messages: list[dict], template: str | None = None) -> list[int]:
    """The conversation rendered through `template` (None: the model's own), ready for the reply."""
    from compiled_serve.chat_template import render_chat

    template = template or engine.chat_template
    if template is None:
        raise InvalidParameterError("chat_template", "the model has no chat template; pass --chat-template")
    tok = engine.tokenizer
    text = render_chat(messages, template, add_generation_prompt=True,
                       bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    return list(tok(text, add_special_tokens=False).input_ids)


def stream_reply(engine: Any, request_id: str, prompt_ids: list[int], params: SamplingParams, out: TextIO) -> str:
    """Runs one request to its end, writing its text as it grows; returns the whole reply."""
    engine.add_request(request_id, prompt_ids, params)
    text = ""
    try:
        finished = False
        while not finished:
            for output in engine.step():
                if output.request_id != request_id:
                    continue
                grown = output.outputs[0].text
                out.write(grown[len(text):])
                out.flush()
                text, finished = grown, output.finished
    except KeyboardInterrupt:  # stop this reply, keep the conversation
        engine.abort_request(request_id)
        while engine.has_unfinished_requests():
            engine.step()
    out.write("\n")
    out.flush()
    return text


def run_chat(engine: Any, params: SamplingParams, stdin: TextIO, stdout: TextIO, system: str | None = None,
             template: str | None = None, interactive: bool = False) -> int:
    """The chat loop with the in-process engine."""

    def reply(request_id: str, messages: list[dict], out: TextIO) -> str:
        return stream_reply(engine, request_id, chat_prompt_ids(engine, messages, template), params, out)

    return run_conversation(reply, stdin, stdout, system=system, interactive=interactive)


def run_conversation(reply: Replier, stdin: TextIO, stdout: TextIO, system: str | None = None,
                     interactive: bool = False) -> int:
    """Reads user turns until /exit or end of input; `reply` streams each answer to stdout."""
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    ids = itertools.count()
    if interactive:
        stdout.write("compiled-serve chat: /reset forgets the conversation, /exit (or Ctrl-D) quits\n")
    while True:
        if interactive:
            stdout.write(">>> ")
            stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in _EXIT:
            break
        if text == "/reset":
            messages = list(opening)
            continue
        messages.append({"role": "user", "content": text})
        answer = reply(f"chat-{next(ids)}", messages, stdout)
        messages.append({"role": "assistant", "content": answer})
    if interactive:
        stdout.write("\n")
    return 0
