"""`EngineConfig.tokenizer`: a tokenizer directory or hub repo id used instead of the model's own,
whatever format the weights came in (GGUF included).

The replacement must fit the model: every id it can produce has to be a row of the embedding
matrix, so a tokenizer with more ids than the model's vocabulary is refused rather than left to
fail on the first out-of-range token. Its chat template, if it has one, replaces the model's.
"""

from __future__ import annotations

import os
from typing import Any

from compiled_serve.errors import ModelLoadError
from compiled_serve.models.loaders.base import LoadedModel
from compiled_serve.models.loaders.hub import TOKENIZER_PATTERNS, download_snapshot, looks_like_repo_id
from compiled_serve.models.loaders.safetensors_dir import load_hf_tokenizer


def load_tokenizer(spec: str) -> Any:
    """The tokenizer in directory `spec`, or in hub repo `spec` (tokenizer files only)."""
    if os.path.isdir(spec):
        directory = spec
    elif looks_like_repo_id(spec):
        directory = download_snapshot(spec, allow_patterns=TOKENIZER_PATTERNS)
    else:
        raise ModelLoadError(f"tokenizer {spec!r} is neither a directory nor a Hugging Face repo id (org/name)")
    tokenizer = load_hf_tokenizer(directory)
    if tokenizer is None:
        raise ModelLoadError(f"tokenizer {spec!r}: {directory} has no tokenizer.json, tokenizer_config.json "
                             "or tokenizer.model")
    return tokenizer


def with_tokenizer(loaded: LoadedModel, tokenizer: Any, spec: str) -> LoadedModel:
    """`loaded` with `tokenizer` (from `load_tokenizer(spec)`) in place of its own."""
    if len(tokenizer) > loaded.config.vocab_size:
        raise ModelLoadError(
            f"tokenizer {spec!r} has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{loaded.config.vocab_size}: its ids would index past the embedding matrix"
        )
    return loaded._replace(
        tokenizer=tokenizer,
        chat_template=getattr(tokenizer, "chat_template", None) or loaded.chat_template,
        source=f"{loaded.source}, tokenizer {spec}",
    )
