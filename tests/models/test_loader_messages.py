"""`load_model` tells the user what it does and what it expected: a start and an end line for the
weight load (seconds, parameters, size), and a path that exists but is not a model named as such."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_hf_model

from compiled_serve.errors import ModelLoadError
from compiled_serve.models.loader import load_model, pick_format


def test_an_existing_file_that_is_not_a_model_says_what_was_expected(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# not a model\n")
    with pytest.raises(ModelLoadError) as error:
        pick_format(str(readme), "auto")
    message = str(error.value)
    assert "is a file but not a model" in message and "does not exist" not in message
    for expected in (".gguf", "config.json", "org/name", "preset"):
        assert expected in message


def test_a_missing_path_is_reported_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist: expected a .gguf file"):
        pick_format(str(tmp_path / "nothing.bin"), "auto")


def test_the_weight_load_logs_its_start_and_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reference = tiny_hf_model("llama")  # transformers counts the parameters
    reference.config.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="compiled_serve.models"):
        load_model(str(tmp_path), load_format="dummy", dtype=torch.float32, device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "compiled_serve.models"]
    assert lines[0].startswith(f"loading weights: {tmp_path} (dummy format, float32 on cpu)")
    end = re.fullmatch(r"loaded weights in [\d.]+s: ([\d.]+)M parameters, ([\d.]+) MiB", lines[-1])
    assert end, lines
    parameters = reference.num_parameters()
    assert float(end.group(1)) == round(parameters / 1e6, 1)
    assert float(end.group(2)) >= round(parameters * 4 / 2**20, 1)  # float32; buffers (RoPE tables) on top
