"""BERT encoder (Hugging Face `BertModel` layout) in plain PyTorch, for sentence embeddings.

Weights load from a safetensors file whose names match transformers' BertModel
(`embeddings.word_embeddings.weight`, `encoder.layer.{i}.attention.self.query.weight`, ...),
optionally under a `bert.` prefix. The pooler is not built: sentence embeddings pool the
last hidden state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from compiled_serve.errors import ModelLoadError


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        raw = json.loads(Path(path).read_text())
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ModelLoadError("only absolute position embeddings are supported for BERT")
        if raw.get("hidden_act", "gelu") not in ("gelu", "relu", "gelu_new"):
            raise ModelLoadError(f"unsupported BERT activation {raw.get('hidden_act')!r}")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in names})


def is_bert_config(path: str | Path) -> bool:
    """True for a directory whose config.json describes a BertModel."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return raw.get("model_type") == "bert" or "BertModel" in raw.get("architectures", [])


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + \
            self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)  # [batch, seq, hidden]


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        h = c.hidden_size
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.intermediate = nn.Linear(h, c.intermediate_size)
        self.output = nn.Linear(c.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.act = (lambda t: F.gelu(t, approximate="tanh")) if c.hidden_act == "gelu_new" else \
            (F.relu if c.hidden_act == "relu" else F.gelu)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [b, heads, s, d]

        ctx = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
                                             attn_mask=attn_bias)
        ctx = ctx.transpose(1, 2).reshape(b, s, -1)  # [b, s, hidden]
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.out_norm(x + self.output(self.act(self.intermediate(x))))


class BertModel(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [batch, seq] -> last hidden state [batch, seq, hidden]."""
        x = self.embeddings(input_ids, torch.zeros_like(input_ids))
        # Additive key mask, broadcast over heads and queries: [batch, 1, 1, seq].
        bias = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(attention_mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        return x

    _RENAMES = (
        ("attention.self.query.", "query."), ("attention.self.key.", "key."), ("attention.self.value.", "value."),
        ("attention.output.dense.", "attn_out."), ("attention.output.LayerNorm.", "attn_norm."),
        ("intermediate.dense.", "intermediate."), ("output.dense.", "output."), ("output.LayerNorm.", "out_norm."),
    )

    def load_safetensors(self, path: str | Path) -> None:
        """Loads HF BertModel weights; fails loudly on any missing or unexpected tensor."""
        state: dict[str, torch.Tensor] = {}
        for name, tensor in load_file(str(path)).items():
            name = name.removeprefix("bert.")
            if name.startswith(("pooler.", "cls.")) or name == "embeddings.position_ids":
                continue
            if name.startswith("encoder.layer."):
                index, _, rest = name.removeprefix("encoder.layer.").partition(".")
                for old, new in self._RENAMES:
                    if rest.startswith(old):
                        rest = new + rest.removeprefix(old)
                        break
                name = f"layers.{index}.{rest}"
            state[name] = tensor
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelLoadError(f"BERT weights do not match the config: missing {sorted(missing)[:4]}, "
                                 f"unexpected {sorted(unexpected)[:4]}")

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> BertModel:
        model_dir = Path(model_dir)
        weights = model_dir / "model.safetensors"
        if not weights.is_file():
            raise ModelLoadError(f"no model.safetensors in {model_dir.name!r}")
        with torch.device("meta"):
            model = cls(BertConfig.from_json(model_dir / "config.json"))
        model = model.to_empty(device=device)
        model.load_safetensors(weights)
        return model.to(dtype).eval()
