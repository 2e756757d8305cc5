"""`ModelConfig`: the shape of a decoder-only transformer, independent of where weights come from.

Every weight format (safetensors directory, GGUF, dummy preset) turns its own metadata into one
of these; model classes read nothing else. `from_hf` accepts a transformers `PretrainedConfig`
or the raw `config.json` dict, old (`rope_theta` + `rope_scaling`) and new (`rope_parameters`)
layouts alike.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from compiled_serve.errors import ModelLoadError

# Architecture-specific facts that HF configs leave implicit.
_QKV_BIAS_ALWAYS = ("Qwen2ForCausalLM",)  # Qwen2Config has no attention_bias field: always biased
_QK_NORM = ("Qwen3ForCausalLM",)
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # HF class name, e.g. "LlamaForCausalLM"; picks the model class in the registry
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelLoadError(f"model config: {name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ModelLoadError("model config: rms_norm_eps and rope_theta must be > 0")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            if kind != "llama3":
                raise ModelLoadError(
                    f"model config: rope scaling {kind!r} is not supported (supported: none, 'llama3')"
                )
            missing = [k for k in _LLAMA3_KEYS if k not in self.rope_scaling]
            if missing:
                raise ModelLoadError(f"model config: llama3 rope scaling lacks {missing}")
        if not all(isinstance(t, int) for t in self.eos_token_ids):
            raise ModelLoadError(f"model config: eos_token_ids must be ints, got {self.eos_token_ids!r}")

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, config: Any) -> ModelConfig:
        """Build from a transformers `PretrainedConfig` or a `config.json` dict."""
        d: Mapping[str, Any] = config if isinstance(config, Mapping) else config.to_dict()
        architecture = _pick_architecture(d)
        try:
            num_heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            theta, scaling = _rope_from_hf(d)
            if d.get("mlp_bias"):
                raise ModelLoadError(f"{architecture}: mlp_bias=True is not supported")
            _reject_sliding_window(architecture, d)
            return cls(
                architecture=architecture,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(d.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=int(d.get("max_position_embeddings") or 4096),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=architecture in _QKV_BIAS_ALWAYS or bool(d.get("attention_bias", False)),
                qk_norm=architecture in _QK_NORM,
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=_as_id_tuple(d.get("eos_token_id")),
            )
        except KeyError as e:
            raise ModelLoadError(f"model config ({architecture}) lacks required field {e.args[0]!r}") from e

    def __hash__(self) -> int:
        # rope_scaling is a dict, which the generated hash would choke on; configs are cache keys.
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for fingerprints and artifact keys)."""
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    # ---- sizes --------------------------------------------------------------------------------

    def num_params(self) -> int:
        """Parameter count of the model this config builds (tied lm_head counted once)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.attention_bias else 0)
        attn += 2 * d if self.qk_norm else 0
        mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 2 * h  # + input / post-attention norms
        embed = self.vocab_size * h
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + self.num_layers * layer + h + lm_head

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V cache one token takes across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.itemsize


def _pick_architecture(d: Mapping[str, Any]) -> str:
    architectures = list(d.get("architectures") or [])
    for arch in architectures:  # prefer one we know, e.g. ["Foo", "LlamaForCausalLM"]
        if arch in _MODEL_TYPE_TO_ARCH.values():
            return arch
    if architectures:
        return architectures[0]
    model_type = d.get("model_type")
    if model_type in _MODEL_TYPE_TO_ARCH:
        return _MODEL_TYPE_TO_ARCH[model_type]
    raise ModelLoadError(f"model config names no architecture (architectures / model_type {model_type!r})")


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers >= 5 folds rope_theta into `rope_parameters`; config.json files in the wild
    # still carry `rope_theta` + `rope_scaling` (whose type key is "rope_type" or legacy "type").
    params = d.get("rope_parameters") or {}
    if params and "rope_type" not in params and "rope_theta" not in params:
        raise ModelLoadError("per-layer-type rope parameters are not supported")
    theta = float(d.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = d.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind in ("default", None):
        return theta, None
    if kind != "llama3":
        raise ModelLoadError(f"rope scaling {kind!r} is not supported (supported: none, 'llama3')")
    return theta, {"rope_type": "llama3", **{k: scaling[k] for k in _LLAMA3_KEYS if k in scaling}}


def _reject_sliding_window(architecture: str, d: Mapping[str, Any]) -> None:
    window = d.get("sliding_window")
    if window is None or d.get("use_sliding_window") is False:
        return  # Qwen2/3 carry a window size but switch it off
    if window >= int(d.get("max_position_embeddings") or 0):
        return  # a window as long as the context is no window
    raise ModelLoadError(f"{architecture}: sliding-window attention (window {window}) is not supported")


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
