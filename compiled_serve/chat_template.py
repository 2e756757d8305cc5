"""Chat templates: render a conversation to the prompt string, safely.

Templates come with models (and, through the API, from users), so they are untrusted code.
They run in Jinja's `ImmutableSandboxedEnvironment`, configured like transformers'
`apply_chat_template` (trim_blocks, lstrip_blocks, loop controls, a non-escaping `tojson`,
`raise_exception`, `strftime_now`), with these extra guards:

- every unsafe attribute access (`''.__class__`, `x.__globals__`) fails at once instead of
  quietly rendering as undefined;
- the template only ever sees plain JSON-like data: validated copies of the messages and of
  the extra keyword arguments, never a tokenizer, a file or a callable;
- string/list repetition, `**` and the rendered length are capped, so a template cannot ask
  for gigabytes.

Every failure a user can cause is an `InvalidParameterError`: field "messages" for a bad
conversation, "chat_template" for a bad template, "chat_template_kwargs" for bad extras.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from compiled_serve.errors import InvalidParameterError

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_MAX_RENDERED_CHARS = 4 * 1024 * 1024
_MAX_REPEAT_ITEMS = 1024 * 1024  # 'x' * n, [..] * n
_MAX_POWER_EXPONENT = 1024
_MAX_ERROR_CHARS = 300


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, '); chat templates want plain JSON, as transformers.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    """`dict(...)` for templates without exposing the `dict` type object itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed names (no reaching into internals)."""

    def __init__(*args: Any, **kwargs: Any):  # self-less, like Namespace, so namespace(self=1) works
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} may not start with an underscore")


class ChatTemplateEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self.filters["tojson"] = _tojson
        self.globals.update(
            raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(), namespace=_Namespace
        )

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    if len(seq) * max(times, 0) > _MAX_REPEAT_ITEMS:
                        raise SecurityError(f"repetition result larger than {_MAX_REPEAT_ITEMS} items")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > _MAX_POWER_EXPONENT:
            raise SecurityError(f"exponent larger than {_MAX_POWER_EXPONENT}")
        return super().call_binop(context, operator, left, right)


_ENVIRONMENT = ChatTemplateEnvironment()
_RESERVED_NAMES = frozenset({"messages", "add_generation_prompt"}) | frozenset(_ENVIRONMENT.globals)


@functools.lru_cache(maxsize=64)
def compile_chat_template(chat_template: str) -> jinja2.Template:
    """Compiles once per distinct template string."""
    try:
        return _ENVIRONMENT.from_string(chat_template)
    except TemplateSyntaxError as exc:
        raise InvalidParameterError("chat_template", _short(f"syntax error on line {exc.lineno}: {exc.message}")) from None


def _short(message: str) -> str:
    return message if len(message) <= _MAX_ERROR_CHARS else message[: _MAX_ERROR_CHARS - 3] + "..."


def _plain_data(value: Any, field: str, where: str) -> Any:
    """A copy of value made only of JSON-like types; anything else is refused."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise InvalidParameterError(field, f"{where}: keys must be strings, got {key!r}")
            out[key] = _plain_data(item, field, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain_data(item, field, f"{where}[{i}]") for i, item in enumerate(value)]
    raise InvalidParameterError(field, f"{where}: unsupported value of type {type(value).__name__}")


def _text_content(content: Any, where: str, role: str, has_tool_calls: bool) -> str | None:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant" and has_tool_calls:
        return None  # OpenAI: an assistant turn that only calls tools has no content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidParameterError(
                    "messages", f"{where}.content[{i}]: only {{'type': 'text', 'text': str}} parts are supported"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidParameterError(
        "messages", f"{where}.content must be a string or a list of text parts, got {type(content).__name__}"
    )


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Checks a conversation and returns plain-data copies with text content flattened."""
    if not isinstance(messages, list) or not messages:
        raise InvalidParameterError("messages", "must be a non-empty list of {'role': ..., 'content': ...} objects")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise InvalidParameterError("messages", f"{where} must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidParameterError("messages", f"{where}.role must be one of {sorted(ROLES)}, got {role!r}")
        if "content" not in message and not message.get("tool_calls"):
            raise InvalidParameterError("messages", f"{where} has no content")
        copy = _plain_data(message, "messages", where)
        copy["content"] = _text_content(message.get("content"), where, role, bool(message.get("tool_calls")))
        checked.append(copy)
    return checked


def render_chat(
    messages: list[dict],
    chat_template: str,
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Renders a conversation with a chat template. Extra keyword arguments (e.g. `tools`,
    `enable_thinking`) reach the template as variables; they must be plain JSON-like data."""
    conversation = validate_messages(messages)
    if not isinstance(chat_template, str) or not chat_template:
        raise InvalidParameterError("chat_template", "must be a non-empty string")
    if not isinstance(bos_token, str) or not isinstance(eos_token, str):
        raise InvalidParameterError("chat_template_kwargs", "bos_token and eos_token must be strings")
    variables: dict[str, Any] = {}
    for name, value in extra.items():
        if name in _RESERVED_NAMES or name.startswith("_"):
            raise InvalidParameterError("chat_template_kwargs", f"{name!r} cannot be set by a caller")
        variables[name] = _plain_data(value, "chat_template_kwargs", name)
    variables.update(
        messages=conversation,
        add_generation_prompt=bool(add_generation_prompt),
        bos_token=bos_token,
        eos_token=eos_token,
    )
    template = compile_chat_template(chat_template)
    pieces, size = [], 0
    try:
        for piece in template.generate(**variables):
            size += len(piece)
            if size > _MAX_RENDERED_CHARS:
                raise InvalidParameterError("chat_template", f"rendered prompt exceeds {_MAX_RENDERED_CHARS} characters")
            pieces.append(piece)
    except InvalidParameterError:
        raise
    except SecurityError as exc:
        raise InvalidParameterError("chat_template", _short(f"refused by the sandbox: {exc}")) from None
    except TemplateError as exc:  # raise_exception(...) and undefined-value errors
        raise InvalidParameterError("chat_template", _short(f"template error: {exc}")) from None
    except Exception as exc:  # a template is code: anything it does wrong is its error
        raise InvalidParameterError("chat_template", _short(f"rendering failed: {type(exc).__name__}: {exc}")) from None
    return "".join(pieces)
