"""A loaded GGUF model kept in the build cache, so a restart skips dequantizing and tokenizer conversion.

Profiling a warm start of the embedded SmolLM2 (Q4_1 GGUF) on a 2-core CPU: 13-15 s went into
transformers converting the GGUF vocabulary into a fast tokenizer, 6 s into dequantizing the
weights; neither result depends on anything but the file, the dtype and our loader code. So
the first start stores what it loaded, as a cache entry of its own (`BuildCache`):

    weights.safetensors        the module's state dict (no pickle), in the engine's dtype
    model_config.json          ModelConfig.to_dict()
    loaded.json                chat template, source text, weight fingerprint
    tokenizer.<file>           tokenizer.save_pretrained() output (JSON), if the model has one

and later starts rebuild the module on the meta device and fill it from those bytes, verified
against the manifest's sha256 like every build. The key covers the file (path, size, mtime:
the same fingerprint the compiled build uses), the dtype and device, the toolchain, and a hash
of the source of `compiled_serve.models` (so a change to any loader or model invalidates it).
Safetensors directories and hub models are not snapshotted: they load by mmap already.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from compiled_serve.cache import BuildKey
from compiled_serve.cache.build_cache import BuildCache
from compiled_serve.cache.build_key import canonical_json
from compiled_serve.config import EngineConfig
from compiled_serve.models.loader import LoadedModel, load_model, pick_format

logger = logging.getLogger("compiled_serve.models")

WEIGHTS = "weights.safetensors"
MODEL_CONFIG = "model_config.json"
LOADED = "loaded.json"
_TOKENIZER_PREFIX = "tokenizer."
SNAPSHOT_MODE = "model-snapshot"


@functools.lru_cache(maxsize=1)
def models_source_hash() -> str:
    """sha256 over every .py file of compiled_serve.models: the code that turns a file into tensors."""
    import compiled_serve.models as models

    root = Path(models.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def snapshot_key(config: EngineConfig, dtype: torch.dtype, device: torch.device) -> BuildKey | None:
    """The cache key of `config`'s loaded model, or None for formats that are not snapshotted."""
    from compiled_serve.models.default_model import default_model_path
    from compiled_serve.models.loaders.base import file_fingerprint

    model = config.model
    if model is None:
        if config.load_format == "dummy":
            return None
        model = default_model_path()
    try:
        fmt = pick_format(model, config.load_format)
    except Exception:  # the real load names the problem
        return None
    if fmt.name != "gguf" or not os.path.isfile(model):
        return None
    path = os.path.realpath(model)
    return BuildKey.for_current_toolchain(
        model_config={"snapshot_of": path, "tokenizer": config.tokenizer, "format": fmt.name},
        weight_fingerprint=file_fingerprint([path]), passes=(("compiled_serve.models", models_source_hash()),),
        buckets=(1,), dtype=dtype, compile_mode=SNAPSHOT_MODE, device=device)


def load_model_cached(config: EngineConfig, dtype: torch.dtype, device: torch.device,
                      cache: BuildCache | None) -> LoadedModel:
    """`load_model` for the engine, through the cache's snapshot when there is one (else it stores one)."""
    key = snapshot_key(config, dtype, device) if cache is not None else None
    if key is not None and cache is not None:
        restored = _restore(cache, key, dtype, device)
        if restored is not None:
            return restored
    loaded = load_model(config.model, load_format=config.load_format, dtype=dtype, device=device,
                        seed=config.seed, tokenizer=config.tokenizer)
    if key is not None and cache is not None:
        _store(cache, key, loaded)
    return loaded


def _restore(cache: BuildCache, key: BuildKey, dtype: torch.dtype, device: torch.device) -> LoadedModel | None:
    from safetensors.torch import load as load_safetensors

    from compiled_serve.models.config import ModelConfig
    from compiled_serve.models.loaders.base import build_empty_module

    start = time.perf_counter()
    build = cache.load(key)
    if build is None:
        return None
    meta = json.loads(build.artifacts[LOADED])
    logger.info("loading weights: %s from the build cache (snapshot %s)", meta["source"], key.digest()[:12])
    try:
        fields = json.loads(build.artifacts[MODEL_CONFIG])
        fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
        model_config = ModelConfig(**fields)
        module = build_empty_module(model_config, dtype, device)
        # assign: the module keeps the loaded tensors (no second 0.5 GiB copy); requires_grad stays off.
        module.load_state_dict(load_safetensors(build.artifacts[WEIGHTS]), strict=True, assign=True)
        tokenizer = _load_tokenizer(build.artifacts, meta["chat_template"])
    except Exception as exc:  # a layout our code no longer builds: load the file instead
        logger.warning("cached model snapshot %s does not fit this code (%s); loading the file",
                       key.digest()[:12], exc)
        cache.discard(key.digest())
        return None
    logger.info("loaded weights in %.1fs: %.1fM parameters, %.1f MiB (from the build cache)",
                time.perf_counter() - start, sum(p.numel() for p in module.parameters()) / 1e6,
                len(build.artifacts[WEIGHTS]) / 2**20)
    return LoadedModel(module=module, config=model_config, tokenizer=tokenizer, chat_template=meta["chat_template"],
                       source=meta["source"], weight_fingerprint=meta["weight_fingerprint"])


def _store(cache: BuildCache, key: BuildKey, loaded: LoadedModel) -> None:
    from safetensors.torch import save as save_safetensors

    start = time.perf_counter()
    try:
        state = {name: t.detach().contiguous() for name, t in loaded.module.state_dict().items()}
        artifacts = {WEIGHTS: save_safetensors(state), MODEL_CONFIG: canonical_json(loaded.config.to_dict()),
                     LOADED: canonical_json({"chat_template": loaded.chat_template, "source": loaded.source,
                                             "weight_fingerprint": loaded.weight_fingerprint})}
        artifacts.update(_tokenizer_files(loaded.tokenizer))
        cache.save(key, artifacts, report={"kind": SNAPSHOT_MODE, "source": loaded.source})
    except Exception as exc:  # the cache must never stop a start
        logger.warning("could not store the loaded model in the build cache: %s", exc)
        return
    logger.info("stored the loaded model in the build cache in %.1fs (snapshot %s)",
                time.perf_counter() - start, key.digest()[:12])


def _tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    if tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory(prefix="compiled-serve-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {_TOKENIZER_PREFIX + name: (Path(tmp) / name).read_bytes()
                for name in sorted(os.listdir(tmp)) if (Path(tmp) / name).is_file()}


def _load_tokenizer(artifacts: Any, chat_template: str | None) -> Any:
    files = {name[len(_TOKENIZER_PREFIX):]: data for name, data in artifacts.items()
             if name.startswith(_TOKENIZER_PREFIX)}
    if not files:
        return None
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="compiled-serve-tokenizer-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
