"""Sentence embeddings with a BERT encoder, pooled as the model's sentence-transformers config says.

For all-MiniLM-L6-v2 that is: tokenize (truncation at max_seq_length), last hidden state,
attention-masked mean over tokens, L2 normalization — the same numbers sentence-transformers
produces. Texts longer than max_seq_length are refused rather than silently truncated.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from compiled_serve.errors import InvalidParameterError, ModelLoadError
from compiled_serve.models.bert import BertModel, is_bert_config

__all__ = ["EmbeddingEngine", "is_embedding_model"]

_BATCH = 32


def is_embedding_model(model: str | None) -> bool:
    return model is not None and Path(model).is_dir() and is_bert_config(model)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


class EmbeddingEngine:
    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        self.model = BertModel.from_pretrained(model_dir, dtype=dtype, device=device)
        # Only the directory's own tokenizer files are read; no remote code.
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        st_config = _read_json(model_dir / "sentence_bert_config.json")
        self.max_seq_length = int(st_config.get("max_seq_length", self.model.config.max_position_embeddings))
        self.max_seq_length = min(self.max_seq_length, self.model.config.max_position_embeddings)
        self.pooling = self._pooling_mode(model_dir)
        modules = _read_json(model_dir / "modules.json") if (model_dir / "modules.json").is_file() else []
        self.normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules) if modules else True
        self.dimension = self.model.config.hidden_size
        self.vocab_size = self.model.config.vocab_size
        self.device = torch.device(device)
        self._lock = threading.Lock()  # one forward at a time (callers run in worker threads)

    @staticmethod
    def _pooling_mode(model_dir: Path) -> str:
        pooling = _read_json(model_dir / "1_Pooling" / "config.json")
        if not pooling or pooling.get("pooling_mode_mean_tokens"):
            return "mean"
        if pooling.get("pooling_mode_cls_token"):
            return "cls"
        raise ModelLoadError("unsupported sentence-transformers pooling mode (mean or cls only)")

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        ids = [list(self.tokenizer(text, add_special_tokens=True).input_ids) for text in texts]
        for i, seq in enumerate(ids):
            if len(seq) > self.max_seq_length:
                raise InvalidParameterError(
                    "input", f"input {i} has {len(seq)} tokens; this model takes at most {self.max_seq_length}")
        return ids

    def check_ids(self, batch: list[list[int]]) -> None:
        for i, seq in enumerate(batch):
            if not seq:
                raise InvalidParameterError("input", f"input {i} is empty")
            if len(seq) > self.max_seq_length:
                raise InvalidParameterError(
                    "input", f"input {i} has {len(seq)} tokens; this model takes at most {self.max_seq_length}")
            if any(not 0 <= t < self.vocab_size for t in seq):
                raise InvalidParameterError("input", f"input {i} has token ids outside [0, {self.vocab_size})")

    @torch.inference_mode()
    def embed_ids(self, batch: list[list[int]]) -> list[list[float]]:
        """Token-id sequences (special tokens included) -> one embedding per sequence."""
        self.check_ids(batch)
        pad = self.tokenizer.pad_token_id or 0
        result: list[list[float]] = []
        with self._lock:
            for start in range(0, len(batch), _BATCH):
                chunk = batch[start:start + _BATCH]
                width = max(len(seq) for seq in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, seq in enumerate(chunk):
                    ids[row, :len(seq)] = torch.tensor(seq)
                    mask[row, :len(seq)] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                hidden = self.model(ids, mask).float()  # [batch, seq, hidden]
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    weights = mask.unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
                if self.normalize:
                    pooled = F.normalize(pooled, p=2, dim=1)
                result.extend(pooled.cpu().tolist())
        return result

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self.embed_ids(self.token_ids(texts))
