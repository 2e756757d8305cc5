"""A path that exists but is not a model says what it is and what was expected, before any
weight load starts (issue 11 item 7); a missing path still says it is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compiled_serve.errors import ModelLoadError
from compiled_serve.models.loader import pick_format

EXPECTED = "expected a .gguf file, a directory with config.json and *.safetensors"


def _message(path: Path) -> str:
    with pytest.raises(ModelLoadError) as error:
        pick_format(str(path), "auto")
    message = str(error.value)
    assert "does not exist" not in message
    return message


def test_a_directory_of_documents(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("# notes\n")
    (tmp_path / "data.csv").write_text("a,b\n")
    message = _message(tmp_path)
    assert "is a directory but not a model" in message
    assert "no config.json and *.safetensors weights" in message and "data.csv, notes.md" in message
    assert EXPECTED in message


def test_an_empty_directory(tmp_path: Path) -> None:
    assert "it is empty" in _message(tmp_path)


def test_a_config_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    message = _message(tmp_path)
    assert "no *.safetensors weights" in message and "config.json" in message.split("holds")[1]


def test_weights_without_a_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    message = _message(tmp_path)
    assert "no config.json" in message and "model.safetensors" in message


def test_pytorch_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert "PyTorch checkpoints (pytorch_model.bin" in _message(tmp_path)
    assert "PyTorch checkpoint (.bin)" in _message(tmp_path / "pytorch_model.bin")


def test_a_directory_holding_a_gguf_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "model-Q4_0.gguf").write_bytes(b"GGUF")
    message = _message(tmp_path)
    assert "holding GGUF file(s)" in message and str(tmp_path / "model-Q4_0.gguf") in message


def test_a_safetensors_file_asks_for_its_directory(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "give the directory that holds it" in _message(tmp_path / "model.safetensors")


def test_a_text_file(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# not a model\n")
    message = _message(readme)
    assert "is a file but not a model" in message and EXPECTED in message


def test_a_model_directory_is_still_one(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert pick_format(str(tmp_path), "auto").name == "safetensors"


def test_serve_says_it_before_loading_anything(tmp_path: Path) -> None:
    """What the user sees: `compiled-serve serve DIR` exits 2 with the message, and no weight load starts."""
    (tmp_path / "notes.md").write_text("# notes\n")
    done = subprocess.run([sys.executable, "-m", "compiled_serve.cli", "serve", str(tmp_path), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"model {str(tmp_path)!r} is a directory but not a model" in done.stderr
    assert "notes.md" in done.stderr and "loading weights" not in done.stderr
    assert "Traceback" not in done.stderr
