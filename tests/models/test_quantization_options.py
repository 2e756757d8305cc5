"""`--quantization` / `--dtype`: vLLM's names reach EngineConfig from the CLI and LLM(), auto picks a
GGUF's own blocks on the CPU, impossible combinations are refused, and the build key covers them."""

from __future__ import annotations

import pytest
import torch

from compiled_serve.cache.build_key import BuildKey
from compiled_serve.config import EngineConfig
from compiled_serve.errors import InvalidParameterError
from compiled_serve.models.quantization import gguf_layout, resolve_quantization

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("command", ["serve", "chat", "compile"])
def test_the_flags_reach_the_engine_config(command: str) -> None:
    from compiled_serve.build.command import config_from_args
    from compiled_serve.cli import _engine_config, build_parser

    extra = ["--build-dir", "b"] if command == "compile" else []
    args = build_parser().parse_args([command, "--quantization", "int4", "--dtype", "bfloat16", *extra])
    config = config_from_args(args) if command == "compile" else _engine_config(args)
    assert (config.quantization, config.dtype) == ("int4", "bfloat16")
    default = build_parser().parse_args([command, *extra])
    # The CLI's default is EngineConfig's (and LLM()'s): auto.
    assert (config_from_args(default) if command == "compile" else _engine_config(default)).quantization == "auto"
    assert EngineConfig().quantization == EngineConfig.field_defaults()["quantization"] == "auto"


def test_an_unknown_quantization_is_refused_by_the_cli_and_the_config() -> None:
    from compiled_serve.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantization", "awq"])
    with pytest.raises(InvalidParameterError, match="quantization"):
        EngineConfig(quantization="awq")


def test_auto_keeps_a_q4_gguf_quantized_on_the_cpu_only(smollm2_gguf: str) -> None:
    assert gguf_layout(smollm2_gguf) == "int4"  # every linear weight of the embedded file is Q4_1
    assert resolve_quantization("auto", None, "auto", CPU) == "gguf"  # None: the embedded model
    assert resolve_quantization(None, smollm2_gguf, "auto", CPU) == "gguf"  # vLLM spells auto None
    assert resolve_quantization("auto", smollm2_gguf, "auto", CUDA) == "none"  # CUDA: dequantized
    assert resolve_quantization("auto", "smollm2-135m", "dummy", CPU) == "none"
    # A missing file is left to the loader, whose error says it does not exist.
    assert resolve_quantization("auto", "missing.gguf", "auto", CPU) == "none"


@pytest.mark.parametrize(("method", "device", "message"), [
    ("fp8", CPU, "needs a CUDA device"),
    ("int4", CUDA, "CPU only"),
    ("gguf", CUDA, "CPU only"),
])
def test_a_method_on_the_wrong_device_is_refused(method: str, device: torch.device, message: str) -> None:
    with pytest.raises(InvalidParameterError, match=message):
        resolve_quantization(method, None, "auto", device)


def test_gguf_needs_a_gguf_file(tmp_path) -> None:
    with pytest.raises(InvalidParameterError, match="needs a .gguf"):
        resolve_quantization("gguf", "smollm2-135m", "dummy", CPU)


def _key(**overrides: object) -> BuildKey:
    fields: dict = dict(model_config={"hidden_size": 64}, weight_fingerprint="w", passes=(("p", "u"),),
                        buckets=(2, 4), dtype="float32", device_capability="cpu", torch_version="2.x",
                        triton_version=None, compile_mode="inductor")
    fields.update(overrides)
    return BuildKey(**fields)


def test_the_build_key_covers_quantization_and_keeps_unquantized_digests() -> None:
    plain, int4 = _key(), _key(quantization="int4")
    assert plain.digest() != int4.digest() and plain.diff(int4) == ["quantization"]
    assert int4.describe_diff(plain) == ["quantization differs (int4 vs none)"]
    # An unquantized key is written as before the field existed: stored builds keep their digests.
    assert "quantization" not in plain.to_dict()
    assert BuildKey.from_dict(plain.to_dict()) == plain and BuildKey.from_dict(int4.to_dict()) == int4
    assert _key(dtype="float16").digest() != plain.digest()
