"""The contract every model class meets (the registry maps architecture names to subclasses).

A model is plain PyTorch: `forward(input_ids, positions)` over one flat token dimension, attention
only through `torch.ops.compiled_serve.causal_attention`, no paging, batching or sampling. The
engine captures `forward` with dynamo (dynamic token dim) and rewrites the graph.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable

import torch
from torch import nn

from compiled_serve.models.config import ModelConfig


class CausalLM(nn.Module, metaclass=abc.ABCMeta):
    config: ModelConfig

    @abc.abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [num_tokens] int64 -> hidden [num_tokens, hidden_size] (final norm applied)."""

    @abc.abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden_size] -> logits [n, vocab_size] float32."""

    @abc.abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the parameters; ModelLoadError on a mismatch."""
