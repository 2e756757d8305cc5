"""Per-rank weight loading: each rank allocates and reads only its shards (safetensors slices,
GGUF tensors, dummy weights), the slices are the ones TP=1 holds, and 2 ranks loaded that way
give TP=1's logits."""

from __future__ import annotations

import pytest
import torch
import tp_testing
from tp_testing import hf_and_ours, prompts, run_ranks, two_step_logits

from compiled_serve.models.loader import load_model
from compiled_serve.models.tp_layout import ShardingError

H, KVH, D, HIDDEN, INTER, VOCAB = 4, 2, 16, 64, 128, 256  # tiny_models' llama


def _expected(full: dict[str, torch.Tensor], name: str, rank: int) -> torch.Tensor:
    """Rank r's slice written out by hand (2 ranks), independent of models/tp_layout.py."""
    w = full[name]
    if "qkv_proj" in name:
        q, k, v = w[: H * D], w[H * D: (H + KVH) * D], w[(H + KVH) * D:]
        half_q, half_kv = H * D // 2, KVH * D // 2
        return torch.cat([q[rank * half_q:(rank + 1) * half_q], k[rank * half_kv:(rank + 1) * half_kv],
                          v[rank * half_kv:(rank + 1) * half_kv]])
    if "gate_up_proj" in name:
        gate, up = w[:INTER], w[INTER:]
        return torch.cat([gate[rank * INTER // 2:(rank + 1) * INTER // 2], up[rank * INTER // 2:(rank + 1) * INTER // 2]])
    if "o_proj" in name or "down_proj" in name:
        n = w.shape[1] // 2
        return w[:, rank * n:(rank + 1) * n]
    if "embed_tokens" in name or "lm_head" in name:
        return w[rank * VOCAB // 2:(rank + 1) * VOCAB // 2]
    return w


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    hf, _ = hf_and_ours("qwen2")  # biased q/k/v
    path = tmp_path_factory.mktemp("tiny-qwen2")
    hf.save_pretrained(path, safe_serialization=True)
    return str(path)


def _check_rank(module, full: dict[str, torch.Tensor], rank: int) -> int:
    sharded = 0
    for name, p in module.named_parameters():
        shard = getattr(p, "tp_shard", None)
        if shard is None:
            torch.testing.assert_close(p, full[name], rtol=0, atol=0)
            continue
        sharded += 1
        assert all(s == 0 for s in p.stride()) and p.shape == full[name].shape  # holds no memory
        torch.testing.assert_close(shard, _expected(full, name, rank), rtol=0, atol=0)
    return sharded


@pytest.mark.parametrize("load_format", ["safetensors", "dummy"])
def test_each_rank_holds_exactly_its_slices(model_dir, load_format):
    whole = load_model(model_dir, load_format=load_format, dtype=torch.float32, device="cpu")
    full = dict(whole.module.named_parameters())
    for rank in (0, 1):
        loaded = load_model(model_dir, load_format=load_format, dtype=torch.float32, device="cpu", tp=(rank, 2))
        # Per layer: qkv weight + bias, o_proj, gate_up, down; plus embedding and lm_head.
        assert _check_rank(loaded.module, full, rank) == 5 * 2 + 2


def test_gguf_ranks_hold_their_slices(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from tiny_models import write_tiny_gguf

    hf, _ = hf_and_ours("llama")
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path, hf, "llama", {})
    full = dict(load_model(path, dtype=torch.float32, device="cpu").module.named_parameters())
    for rank in (0, 1):
        module = load_model(path, dtype=torch.float32, device="cpu", tp=(rank, 2)).module
        assert _check_rank(module, full, rank) == 4 * 2 + 2


def test_sharded_tensors_are_read_as_slices_never_whole(model_dir, monkeypatch):
    import compiled_serve.models.loaders.safetensors_dir as st

    whole_reads: list[str] = []
    real = st.safe_open

    class Counting:
        def __init__(self, *a, **k):
            self._f = real(*a, **k)

        def __enter__(self):
            self._inner = self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_tensor(self, name):
            whole_reads.append(name)
            return self._inner.get_tensor(name)

        def get_slice(self, name):
            return self._inner.get_slice(name)

    monkeypatch.setattr(st, "safe_open", Counting)
    load_model(model_dir, dtype=torch.float32, device="cpu", tp=(1, 2))
    assert whole_reads == []


def test_indivisible_load_is_refused_before_reading(model_dir):
    with pytest.raises(ShardingError, match="not divisible by tensor_parallel_size 3"):
        load_model(model_dir, dtype=torch.float32, device="cpu", tp=(0, 3))


def test_two_ranks_loaded_per_rank_match_tp1(model_dir):
    whole = load_model(model_dir, dtype=torch.float32, device="cpu")
    tp1 = two_step_logits(whole.module, prompts())
    for r in run_ranks(tp_testing.rank_two_steps_loaded, 2, model_dir, "safetensors"):
        torch.testing.assert_close(r["prefill"], tp1["prefill"], rtol=0, atol=2e-5)
        torch.testing.assert_close(r["decode"], tp1["decode"], rtol=0, atol=2e-5)
