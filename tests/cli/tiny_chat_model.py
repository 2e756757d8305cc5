"""A tiny random-weight Llama directory with a word-level tokenizer and a chat template: enough for
the CLI's chat and serve commands to run a real engine in seconds (`--load-format dummy`)."""

from __future__ import annotations

import json
from pathlib import Path

VOCAB_SIZE = 256
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant {% endif %}")
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB_SIZE, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "eos_token_id": 2,
}


def write_tiny_chat_model(directory: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG))
    words = ["<unk>", "<s>", "</s>", "user", "assistant", "system", "hello", "world", "again"]
    vocab = {word: i for i, word in enumerate(words + [f"w{i}" for i in range(VOCAB_SIZE - len(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return directory


def dummy_flags(directory: Path) -> list[str]:
    """CLI flags for that model: random weights, no Inductor, a small KV cache."""
    return [str(directory), "--load-format", "dummy", "--dtype", "float32", "--compile-mode", "graph",
            "--num-kv-blocks", "300", "--max-num-seqs", "4"]
