"""A Hugging Face hub repo id ("org/name"): snapshot the config, tokenizer and safetensors files
(honouring HF_HUB_OFFLINE and the local cache), then load the snapshot as a directory."""

from __future__ import annotations

import dataclasses
import os
import re

from compiled_serve.errors import ModelLoadError
from compiled_serve.models.loaders.base import LoadedModel, LoadRequest, WeightFormat, register_format
from compiled_serve.models.loaders.safetensors_dir import load_safetensors_dir

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a tokenizer needs (tokenizer.json / vocab files, special-token maps, chat templates), and
# everything a safetensors snapshot needs: those plus the weights (no .bin / .pth / .gguf duplicates).
TOKENIZER_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]
ALLOW_PATTERNS = [*TOKENIZER_PATTERNS, "*.safetensors"]


def looks_like_repo_id(model: str) -> bool:
    return not os.path.exists(model) and bool(_REPO_ID.match(model))


def download_snapshot(repo_id: str, allow_patterns: list[str] = ALLOW_PATTERNS) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=allow_patterns)
    except LocalEntryNotFoundError as e:
        hint = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        raise ModelLoadError(
            f"model {repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"{hint}; download it first or pass a local path"
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:  # network, auth, bad id
        raise ModelLoadError(f"cannot fetch {repo_id!r} from the Hugging Face hub: {e}") from e


@register_format
class HubFormat(WeightFormat):
    name = "hub"
    auto_priority = 90

    def claims(self, model: str) -> bool:
        return looks_like_repo_id(model)

    def load(self, request: LoadRequest) -> LoadedModel:
        if not looks_like_repo_id(request.model):
            raise ModelLoadError(f"{request.model!r} is neither an existing path nor a hub repo id (org/name)")
        directory = download_snapshot(request.model)
        return load_safetensors_dir(dataclasses.replace(request, model=directory), source_prefix=f"hf:{request.model}")
