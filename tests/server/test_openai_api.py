"""The OpenAI-compatible API through the official `openai` client, against the real engine in its
own process (as `serve` runs it). Tokenization is checked against the model file's own tokenizer,
built here independently of the engine."""

from __future__ import annotations

import math
from typing import Any

import httpx
import openai
import pytest
from live_server import generation_server

API_KEY = "test-key"
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def live(core):
    yield from generation_server(core, api_key=API_KEY)


@pytest.fixture(scope="module")
def reference_tokenizer() -> Any:
    from compiled_serve.models.default_model import default_model_path
    from compiled_serve.models.loaders.gguf_file import load_gguf_tokenizer

    return load_gguf_tokenizer(default_model_path(), None)


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True).input_ids)


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_models(client: openai.OpenAI, live) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert models[0].model_extra["max_model_len"] == live.state.max_model_len


def test_completion_greedy_and_usage(client: openai.OpenAI, model: str, reference_tokenizer) -> None:
    response = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                         temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "length" and choice.text
    prompt_ids = _tokenize(reference_tokenizer, "The capital of France is")
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == 8
    assert response.usage.total_tokens == len(prompt_ids) + 8
    again = client.completions.create(model=model, prompt=prompt_ids, max_tokens=8, temperature=0)
    assert again.choices[0].text == choice.text  # token-id prompts are the same prompt


def test_completion_batch_prompts_echo_and_n(client: openai.OpenAI, model: str) -> None:
    response = client.completions.create(model=model, prompt=["One, two,", "Red, green,"], max_tokens=4, n=2,
                                         temperature=0.8, seed=3, echo=True)
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in response.choices}
    assert by_index[0].startswith("One, two,") and by_index[3].startswith("Red, green,")
    assert response.usage.completion_tokens == 16


def test_streaming_completion_with_usage(client: openai.OpenAI, model: str) -> None:
    full = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format_ends_with_done(live) -> None:
    with live.client(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        with http.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_chat_completion_and_stream(client: openai.OpenAI, model: str) -> None:
    response = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0)
    message = response.choices[0].message
    assert message.role == "assistant" and message.content
    assert response.object == "chat.completion"
    stream = client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens


def test_chat_n_and_logprobs(client: openai.OpenAI, model: str) -> None:
    response = client.chat.completions.create(model=model, messages=CHAT, max_tokens=5, n=3, temperature=1.0,
                                              seed=11, logprobs=True, top_logprobs=3)
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    for choice in response.choices:
        content = choice.logprobs.content
        assert 1 <= len(content) <= 5  # one entry per generated token
        for entry in content:
            assert entry.logprob <= 0 and math.isfinite(entry.logprob)
            assert len(entry.top_logprobs) == 3
            tops = [t.logprob for t in entry.top_logprobs]
            assert tops == sorted(tops, reverse=True)
            assert entry.logprob <= tops[0] + 1e-5


def test_completion_logprobs_greedy_is_top1(client: openai.OpenAI, model: str) -> None:
    response = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=6, temperature=0,
                                         logprobs=2)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    for token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert max(top.values()) == pytest.approx(lp, abs=1e-5)  # greedy: the sampled token is the top-1
        assert token in top
    assert "".join(logprobs.tokens) == response.choices[0].text


def test_stop_strings(client: openai.OpenAI, model: str) -> None:
    free = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0).choices[0]
    assert " 6" in free.text
    stopped = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                        stop=[" 6", "never"]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(" 6")]
    assert stopped.model_extra["stop_reason"] == " 6"


def test_seeded_sampling_reproduces(client: openai.OpenAI, model: str) -> None:
    def sample() -> list[str]:
        response = client.completions.create(model=model, prompt="My favourite animal is", max_tokens=10,
                                             temperature=1.0, top_p=0.95, seed=1234, n=2)
        return [c.text for c in sorted(response.choices, key=lambda c: c.index)]

    first, second = sample(), sample()
    assert first == second


def test_extra_sampling_fields(client: openai.OpenAI, model: str) -> None:
    response = client.completions.create(
        model=model, prompt="Hello", max_tokens=6, temperature=0.7, seed=5,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True,
                    "min_tokens": 6, "stop_token_ids": [0]})
    assert response.usage.completion_tokens == 6


def test_error_mapping(live, client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-unknown", prompt="hi", max_tokens=2)
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="hi", max_tokens=2, n=99)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="hi", max_tokens=live.state.max_model_len)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="hi", max_tokens=2, logprobs=50)
    assert err.value.body["param"] == "logprobs"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.base_url + "/v1", api_key="nope", max_retries=0).models.list()
    # After all those errors the server still serves.
    served = client.completions.create(model=model, prompt="hi", max_tokens=2, extra_body={"ignore_eos": True})
    assert served.choices[0].finish_reason == "length" and served.usage.completion_tokens == 2


def test_server_tokenizer_is_the_models(live, reference_tokenizer) -> None:
    """The engine core sends its tokenizer over as files; the server's copy tokenizes, decodes and
    templates exactly as the model file's own tokenizer."""
    served = live.state.tokenizer
    texts = ["hello there", "Le café, le thé", "你好，世界！", "<|im_start|>user\nHi<|im_end|>", "  spaced  out \n"]
    for text in texts:
        ids = _tokenize(reference_tokenizer, text)
        assert _tokenize(served, text) == ids
        assert served.decode(ids, skip_special_tokens=True) == reference_tokenizer.decode(ids, skip_special_tokens=True)
    assert live.state.chat_template == reference_tokenizer.chat_template
    assert (served.eos_token_id, served.bos_token_id) == (reference_tokenizer.eos_token_id,
                                                          reference_tokenizer.bos_token_id)


def test_tokenize_detokenize_version(live, reference_tokenizer) -> None:
    with live.client(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        ids = http.post("/tokenize", json={"prompt": "hello there"}).json()["tokens"]
        assert ids == _tokenize(reference_tokenizer, "hello there")
        assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "hello there"
        chat_ids = http.post("/tokenize", json={"messages": CHAT}).json()
        assert chat_ids["count"] == len(chat_ids["tokens"]) > 5
        assert http.get("/version").json()["version"]
        metrics = http.get("/metrics").text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "num_requests_running", "num_requests_waiting",
                 "kv_cache_usage_perc", "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total"):
        assert f"compiled_serve_{name}" in metrics, name
    assert httpx.get(live.base_url + "/metrics").status_code == 401


def test_continue_final_message(live) -> None:
    messages = CHAT + [{"role": "assistant", "content": "The capital of France is"}]
    with live.client(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        response = http.post("/v1/chat/completions", json={
            "messages": messages, "add_generation_prompt": False, "continue_final_message": True,
            "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200, response.text
        # The prompt ends inside the assistant turn: no end-of-turn token after its content.
        tokens = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()["tokens"]
        assert response.json()["usage"]["prompt_tokens"] < len(tokens)
        refused = http.post("/v1/chat/completions", json={"messages": CHAT, "continue_final_message": True,
                                                          "add_generation_prompt": False, "max_tokens": 2})
        assert refused.status_code == 400


def test_request_chat_template_refused_by_default(live) -> None:
    with live.client(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        response = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2,
                                                           "chat_template": "{{ messages }}"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "chat_template"
        assert http.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
        assert http.post("/detokenize", json={"tokens": [live.state.vocab_size - 1]}).status_code == 200
