"""Test-wide setup.

Without CUDA, Triton kernels run in the interpreter (TRITON_INTERPRET=1), so they are tested
against their pure-torch references on the CPU. The variable must be set before any kernel
module is imported, hence here at the root of the test tree.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
