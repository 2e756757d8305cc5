"""Shared fixtures for model tests: the embedded SmolLM2 GGUF, loaded once by us and once by
Hugging Face transformers (the reference), plus helpers to run both on one sequence."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from model_parity import PROMPTS


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from compiled_serve.models.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf: str) -> Any:
    """transformers' own GGUF path: it dequantizes and un-permutes q/k itself.

    `from_pretrained(gguf_file=...)` needs `accelerate`, which is not a dependency, so this drives
    the same `load_gguf_checkpoint` that from_pretrained uses, into a model built from the
    config transformers parsed out of the GGUF.
    """
    import transformers.utils.logging as hf_logging
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_logging.disable_progress_bar()
    directory, name = smollm2_gguf.rsplit("/", 1)
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    config._attn_implementation = "eager"
    with no_init_weights():  # every weight is overwritten below; skip the slow random init
        model = LlamaForCausalLM(config)
    state = load_gguf_checkpoint(smollm2_gguf, return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


@pytest.fixture(scope="session")
def our_smollm2() -> Any:
    from compiled_serve.models.loader import load_model

    return load_model(None, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def prompt_ids(our_smollm2: Any) -> list[torch.Tensor]:
    return [our_smollm2.tokenizer(p, return_tensors="pt").input_ids[0] for p in PROMPTS]
