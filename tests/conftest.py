"""Test-wide setup.

Without CUDA, Triton kernels run in the interpreter (TRITON_INTERPRET=1), so they are tested
against their pure-torch references on the CPU. The variable must be set before any kernel
module is imported, hence here at the root of the test tree.

The build cache (`LLM()`, `serve` and `chat` keep builds in it by default) goes to a directory of
this test session, so tests never read or fill the user's ~/.cache/compiled_serve, and a start in
one test cannot turn another test's compile into a cache hit unless it shares that directory.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["COMPILED_SERVE_CACHE_ROOT"] = _TEST_CACHE = tempfile.mkdtemp(prefix="compiled-serve-test-cache-")
atexit.register(shutil.rmtree, _TEST_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
