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


def _tiny_gguf(path: str, qtypes: dict) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from tiny_models import write_tiny_gguf

    hf, _ = hf_and_ours("llama")  # llama: q/k rows permuted in the file (unpermuted per head on read)
    write_tiny_gguf(path, hf, "llama", qtypes)


def _count_dequantized(monkeypatch) -> list[tuple[str, int]]:
    """Every float array gguf-py's dequantize makes, as (GGML type, bytes): what a load materializes."""
    import gguf.quants

    made: list[tuple[str, int]] = []
    real = gguf.quants.dequantize

    def counting(data, qtype):
        out = real(data, qtype)
        made.append((qtype.name, out.nbytes))
        return out

    monkeypatch.setattr(gguf.quants, "dequantize", counting)
    return made


def _qtypes(name: str) -> dict:
    import gguf

    Q = gguf.GGMLQuantizationType
    return {"f32": {}, "f16": {"": Q.F16}, "q8_0": {"": Q.Q8_0}, "q4_0": {"": Q.Q4_0}}[name]


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_ranks_dequantize_only_their_slices(tmp_path, monkeypatch, qtype):
    path = str(tmp_path / "tiny.gguf")
    _tiny_gguf(path, _qtypes(qtype))
    made = _count_dequantized(monkeypatch)
    full = dict(load_model(path, dtype=torch.float32, device="cpu").module.named_parameters())
    whole_bytes = sum(n for _, n in made)
    assert whole_bytes == sum(p.nbytes for p in full.values())  # TP=1: every tensor once, whole
    for rank in (0, 1):
        made.clear()
        module = load_model(path, dtype=torch.float32, device="cpu", tp=(rank, 2)).module
        assert _check_rank(module, full, rank) == 4 * 2 + 2
        # What the rank dequantized is exactly what it holds, its shards and the replicated norms:
        # about half the checkpoint. A whole read of any sharded tensor would add its other half.
        held = [getattr(p, "tp_shard", p) for p in module.parameters()]
        assert sum(n for _, n in made) == sum(t.nbytes for t in held) < 0.55 * whole_bytes
        # No array larger than the largest shard (the vocabulary's half): the embedding, read whole,
        # would be twice that.
        assert max(n for _, n in made) == max(t.nbytes for t in held) == full["model.embed_tokens.weight"].nbytes // 2


def test_unaligned_gguf_column_slices_are_read_a_chunk_of_rows_at_a_time(tmp_path, monkeypatch):
    """4 ranks: o_proj's 64 input columns are 16 per rank, half a Q8_0 block (32), so no block holds
    just one rank's columns. Rows are dequantized a chunk at a time and only the columns kept."""
    import gguf

    import compiled_serve.models.loaders.gguf_slice as gguf_slice

    path = str(tmp_path / "tiny.gguf")
    _tiny_gguf(path, {"attn_output": gguf.GGMLQuantizationType.Q8_0})  # everything else F32
    full = dict(load_model(path, dtype=torch.float32, device="cpu").module.named_parameters())
    chunk = 16 * HIDDEN * 4  # 16 of o_proj's 64 rows
    monkeypatch.setattr(gguf_slice, "CHUNK_BYTES", chunk)
    made = _count_dequantized(monkeypatch)
    o_proj = [f"model.layers.{i}.self_attn.o_proj.weight" for i in range(2)]
    for rank in range(4):
        made.clear()
        module = load_model(path, dtype=torch.float32, device="cpu", tp=(rank, 4)).module
        params = dict(module.named_parameters())
        for name in o_proj:
            torch.testing.assert_close(params[name].tp_shard, full[name][:, rank * 16:(rank + 1) * 16], rtol=0, atol=0)
        q8 = [n for q, n in made if q == "Q8_0"]
        assert q8 == [chunk] * 4 * len(o_proj)  # each layer's rows in 4 chunks, never the whole [64, 64]


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
