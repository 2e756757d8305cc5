"""render_chat against transformers' apply_chat_template, plus sandbox and validation checks."""

from __future__ import annotations

import pytest

from compiled_serve.chat_template import compile_chat_template, render_chat
from compiled_serve.errors import InvalidParameterError

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Write a haiku about 🌸 and 東京"},
        {"role": "assistant", "content": "Petals drift softly\nover the city's bright hum\nspring in Tōkyō"},
        {"role": "user", "content": "Now one with <tags> & \"quotes\""},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "  spaces  \n\n newlines\t"},
        {"role": "assistant", "content": "ok"},
    ],
]

# Exercises what the environment must match transformers on: trim_blocks/lstrip_blocks
# whitespace, namespace, loop controls, a non-escaping tojson and bos/eos tokens.
RICH_TEMPLATE = """{%- set ns = namespace(system='') -%}
{%- for m in messages if m.role == 'system' -%}{%- set ns.system = m.content -%}{%- endfor -%}
{{ bos_token }}
{%- if tools %}
<tools>
{% for t in tools %}
    {{ t | tojson }}
{% endfor %}
</tools>
{% endif %}
{% if ns.system %}[SYS] {{ ns.system }}
{% endif %}
{% for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% if loop.index0 > 50 %}{% break %}{% endif %}
    <{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>{{ eos_token if m.role == 'assistant' }}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}
"""

TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Météo <now> & 'later'",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers_on_smollm2_chatml(smollm2_tokenizer, conversation, add_generation_prompt):
    tok = smollm2_tokenizer
    expected = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    ours = render_chat(conversation, tok.chat_template, add_generation_prompt=add_generation_prompt,
                       bos_token=tok.bos_token, eos_token=tok.eos_token)
    assert ours == expected
    assert ours.startswith("<|im_start|>system\n")


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_matches_transformers_on_a_rich_template(smollm2_tokenizer, conversation, tools):
    tok = smollm2_tokenizer
    expected = tok.apply_chat_template(conversation, chat_template=RICH_TEMPLATE, tools=tools, tokenize=False,
                                       add_generation_prompt=True)
    ours = render_chat(conversation, RICH_TEMPLATE, bos_token=tok.bos_token, eos_token=tok.eos_token, tools=tools)
    assert ours == expected
    if tools:
        assert "Météo <now> & 'later'" in ours  # tojson does not HTML-escape


def test_text_parts_are_joined(smollm2_tokenizer):
    tok = smollm2_tokenizer
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}]
    joined = [{"role": "user", "content": "first\nsecond"}]
    assert render_chat(parts, tok.chat_template) == tok.apply_chat_template(joined, tokenize=False,
                                                                             add_generation_prompt=True)


def test_caller_messages_are_not_modified():
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}]}]
    render_chat(messages, "{{ messages[0].content }}")
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "a"}]}]


def test_templates_are_compiled_once():
    template = "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"
    compile_chat_template.cache_clear()
    for text in ("a", "b", "c"):
        assert render_chat([{"role": "user", "content": text}], template) == f"user:{text};"
    info = compile_chat_template.cache_info()
    assert (info.misses, info.hits) == (1, 2)


UNSAFE_TEMPLATES = [
    ("{{ ''.__class__.__mro__ }}", "sandbox"),
    ("{{ ''.__class__ }}", "sandbox"),
    ("{{ messages.__class__.__base__.__subclasses__() }}", "sandbox"),
    ("{{ cycler.__init__.__globals__ }}", "sandbox"),
    ("{{ raise_exception.__globals__ }}", "sandbox"),
    ("{{ self._TemplateReference__context }}", "sandbox"),
    ("{{ messages['__class__'] }}", "sandbox"),
    ("{{ (messages|first).__class__ }}", "sandbox"),
    ("{{ messages.append(1) }}", "sandbox"),
    ("{% set x = messages.pop() %}", "sandbox"),
    ("{{ messages[0].update(role='system') }}", "sandbox"),
    ("{{ namespace(_hidden=1) }}", "sandbox"),
    ("{% set ns = namespace() %}{% set ns.__dict__ = 1 %}", "sandbox"),
    ("{{ dict.__call__.__globals__ }}", "sandbox"),
    ("{{ 'x' * 100000000 }}", "repetition"),
    ("{{ [1] * 10000000 }}", "repetition"),
    ("{{ 2 ** 100000 }}", "exponent"),
    ("{{ range(100001) | list | length }}", "Range too big"),
    ("{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}", "exceeds"),
]


@pytest.mark.parametrize("template, reason", UNSAFE_TEMPLATES)
def test_unsafe_templates_are_refused(template, reason):
    with pytest.raises(InvalidParameterError, match=reason) as info:
        render_chat([{"role": "user", "content": "hi"}], template)
    assert info.value.field == "chat_template"
    assert len(str(info.value)) < 400


def test_safe_operations_still_work():
    template = ("{{ 'ab' * 3 }}|{{ 2 ** 10 }}|{{ dict(a=1)['a'] }}|{% set ns = namespace(n=0) %}"
                "{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|{{ messages | length }}|"
                "{{ strftime_now('%Y') | length }}|{{ flag }}|{{ tools[0].name }}")
    out = render_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], template,
                      flag=True, tools=[{"name": "calc"}])
    assert out == "ababab|1024|1|2|2|4|True|calc"


def test_template_errors_are_typed():
    alternating = ("{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                   "{{ m.content }}{% endfor %}")
    ok = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render_chat(ok, alternating) == "ab"
    with pytest.raises(InvalidParameterError, match="roles must alternate") as info:
        render_chat(ok[::-1], alternating)
    assert info.value.field == "chat_template"
    with pytest.raises(InvalidParameterError, match="syntax error on line 2") as info:
        render_chat(ok, "fine\n{% for m in messages %}{{ m.content }")
    assert info.value.field == "chat_template"
    for template in ("{{ undefined_thing.attr }}", "{{ messages[0].content + 5 }}", ""):
        with pytest.raises(InvalidParameterError) as info:
            render_chat(ok, template)
        assert info.value.field == "chat_template"


BAD_MESSAGES = [
    [],
    "hello",
    None,
    ({"role": "user", "content": "tuple, not list"},),
    ["not a dict"],
    [{"content": "no role"}],
    [{"role": "robot", "content": "x"}],
    [{"role": None, "content": "x"}],
    [{"role": "user"}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": {"text": "dict"}}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
    [{"role": "user", "content": [{"type": "text"}]}],
    [{"role": "user", "content": [{"type": "text", "text": 3}]}],
    [{"role": "user", "content": ["bare string part"]}],
    [{"role": "user", "content": "ok", "name": object()}],
    [{"role": "user", "content": "ok", 3: "non-string key"}],
    [{"role": "user", "content": "ok"}, {"role": "assistant", "content": None}],
]


@pytest.mark.parametrize("messages", BAD_MESSAGES)
def test_bad_messages_are_rejected(messages):
    with pytest.raises(InvalidParameterError) as info:
        render_chat(messages, "{{ messages }}")
    assert info.value.field == "messages"


def test_assistant_tool_call_turn_without_content_is_accepted():
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {"name": "w"}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "1"}]
    template = "{% for m in messages %}{{ m.role }}={{ m.content }}{{ m.tool_calls | tojson if m.tool_calls }};{% endfor %}"
    assert render_chat(messages, template) == (
        'user=weather?;assistant=None[{"id": "1", "function": {"name": "w"}}];tool=sunny;'
    )


def test_extra_kwargs_cannot_override_or_smuggle():
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TypeError):
        render_chat(messages, "{{ messages }}", **{"messages": []})
    with pytest.raises(TypeError):
        render_chat(messages, "{{ x }}", **{"add_generation_prompt": "yes", "chat_template": "x"})
    for name, value in [("raise_exception", "x"), ("namespace", 1), ("range", [1]), ("_private", 1),
                        ("opener", open), ("tokenizer", object()), ("fn", lambda: 1), ("nested", {"f": print})]:
        with pytest.raises(InvalidParameterError) as info:
            render_chat(messages, "{{ x }}", **{name: value})
        assert info.value.field == "chat_template_kwargs", name
    with pytest.raises(InvalidParameterError):
        render_chat(messages, "{{ x }}", bos_token=None)
    assert render_chat(messages, "{{ add_generation_prompt }}", add_generation_prompt=False) == "False"
