"""Shared by the distributed tests: run a function on N gloo ranks in fresh processes, and the
two-step (prefill, then one decode) harness the pass parity tests run on every rank.

Ranks rendezvous through a FileStore in a private temp dir (no TCP store); gloo's pair sockets
stay on loopback (GLOO_SOCKET_IFNAME=lo). Results come back as safetensors files, errors as text.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0] / "models"))
from tiny_models import ours_from_hf, tiny_hf_model  # noqa: E402

BLOCK_SIZE, NUM_BLOCKS = 4, 16


def _rank_main(rank: int, world_size: int, store_path: str, out_dir: str, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank,
                                world_size=world_size)
        result = fn(rank, world_size, *args)
        save_file({k: v.contiguous() for k, v in result.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
        dist.destroy_process_group()
    except BaseException:
        Path(out_dir, f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 240.0) -> list[dict[str, torch.Tensor]]:
    """fn(rank, world_size, *args) -> dict of tensors, on `world_size` spawned gloo ranks."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank_main, args=(r, world_size, os.path.join(tmp, "store"), tmp, fn, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join()
        errors = [Path(tmp, f"rank{r}.error").read_text() for r in range(world_size)
                  if Path(tmp, f"rank{r}.error").exists()]
        if errors or alive:
            raise AssertionError(f"ranks failed (timed out: {len(alive)}):\n" + "\n".join(errors))
        return [load_file(os.path.join(tmp, f"rank{r}.safetensors")) for r in range(world_size)]


def hf_and_ours(kind: str, **overrides: Any) -> tuple[Any, torch.nn.Module]:
    hf = tiny_hf_model(kind, **overrides)
    return hf, ours_from_hf(hf).eval()


def prompts(lengths: tuple[int, ...] = (7, 5), vocab: int = 256) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _metadata(seqs: list[list[int]], new: list[int], num_layers: int, caches: list[torch.Tensor] | None,
              kv_heads: int, head_dim: int) -> Any:
    """Metadata for a step adding `new[i]` tokens to sequence i (blocks laid out in order)."""
    from compiled_serve.kernels.forward_context import AttentionMetadata

    if caches is None:
        caches = [torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, kv_heads, head_dim) for _ in range(num_layers)]
    width = 4
    slots, tables, qsl, lens = [], [], [0], []
    for i, (seq, n) in enumerate(zip(seqs, new)):
        blocks = list(range(i * width, (i + 1) * width))
        tables.append(blocks)
        slots += [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(len(seq) - n, len(seq))]
        qsl.append(qsl[-1] + n)
        lens.append(len(seq))
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor(tables, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        max_query_len=max(new), max_seq_len=max(lens), kv_caches=caches,
        seq_lens_host=lens, query_start_loc_host=qsl)


@torch.no_grad()
def two_step_logits(model: torch.nn.Module, seqs: list[list[int]], rank: int = 0, world_size: int = 1,
                    fusions: bool = False) -> dict:
    """Prefill every sequence, then decode the greedy next token of each, through the compiled
    step (paged attention; with world_size > 1 also TensorParallelPass and the sharded logits;
    `fusions`: every built-in pass first, the opt-in kernel fusions included)."""
    from compiled_serve.kernels.forward_context import forward_context
    from compiled_serve.models.tp_layout import head_split
    from compiled_serve.passes.manager import PassManager
    from compiled_serve.passes.paged_attention import PagedAttentionPass
    from compiled_serve.passes.pipeline import compile_model
    from compiled_serve.passes.tensor_parallel import TensorParallelPass
    from compiled_serve.passes.tp_pipeline import compile_logits

    cfg = model.config
    passes: list = [PagedAttentionPass()]
    if fusions:
        from compiled_serve.passes.registry import BUILTIN_PASSES

        passes = [cls() for cls in BUILTIN_PASSES.values()]
    kv_heads = cfg.num_kv_heads
    logits_fn = model.compute_logits
    if world_size > 1:
        tp = TensorParallelPass(rank, world_size)
        passes.append(tp)
        kv_heads = head_split(cfg.num_heads, cfg.num_kv_heads, rank, world_size).num_kv_heads
        logits_fn, _ = compile_logits(model, rank, world_size)
    step, report = compile_model(model, mode="graph", passes=PassManager(passes))
    seqs = [list(s) for s in seqs]
    meta = _metadata(seqs, [len(s) for s in seqs], cfg.num_layers, None, kv_heads, cfg.head_dim)
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.tensor([p for s in seqs for p in range(len(s))])
    with forward_context(meta):
        prefill = logits_fn(step(ids, pos))  # [T, V]
    last = torch.tensor([len(s) for s in seqs]).cumsum(0) - 1
    next_ids = prefill[last].argmax(-1)
    for s, t in zip(seqs, next_ids.tolist()):
        s.append(t)
    meta2 = _metadata(seqs, [1] * len(seqs), cfg.num_layers, meta.kv_caches, kv_heads, cfg.head_dim)
    with forward_context(meta2):
        decode = logits_fn(step(next_ids, torch.tensor([len(s) - 1 for s in seqs])))  # [S, V]
    out = {"prefill": prefill, "decode": decode, "next_ids": next_ids}
    if world_size > 1:
        out["kv_cache0"] = meta.kv_caches[0]
        out["num_graphs"] = torch.tensor(report.num_graphs)
    return out


def hf_logits(hf: Any, seqs: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [hf(torch.tensor([s])).logits[0].float() for s in seqs]


def rank_two_steps(rank: int, world_size: int, cases: list[tuple[str, dict]]) -> dict:
    """On one rank, for each (kind, overrides, fusions): the tiny model (same seed everywhere), sharded,
    two steps; keys are prefixed with the case's index. One spawn for every case: starting a
    rank (imports, first compile) costs more than a case."""
    out = {}
    for i, (kind, overrides, fusions) in enumerate(cases):
        _, ours = hf_and_ours(kind, **overrides)
        out.update({f"{i}.{k}": v for k, v in two_step_logits(ours, prompts(), rank, world_size, fusions).items()})
    return out


class _Captured(Exception):
    pass


def rewritten_graph(model: torch.nn.Module, passes: list) -> torch.fx.GraphModule:
    """The step graph of `model` after `passes`, rewritten inside dynamo's backend (where the
    placeholders still carry their tensors) and never run."""
    from compiled_serve.kernels.forward_context import forward_context
    from compiled_serve.passes.manager import PassManager
    from compiled_serve.passes.pipeline import step_entry_point

    graphs = []

    def grab(gm: torch.fx.GraphModule, inputs: list) -> Any:
        PassManager(passes)(gm)
        graphs.append(gm)
        raise _Captured

    torch._dynamo.reset()
    cfg = model.config
    meta = _metadata([[0] * 5], [5], cfg.num_layers, None, cfg.num_kv_heads, cfg.head_dim)
    try:
        with torch.no_grad(), forward_context(meta):
            torch.compile(step_entry_point(model), backend=grab, fullgraph=True, dynamic=True)(
                torch.arange(5), torch.arange(5))
    except torch._dynamo.exc.BackendCompilerFailed as e:
        if not isinstance(e.inner_exception, _Captured):
            raise e.inner_exception from e
    assert len(graphs) == 1
    return graphs[0]


def rank_two_steps_loaded(rank: int, world_size: int, model_dir: str, load_format: str) -> dict:
    """On one rank: the model read per rank from `model_dir` (only its shards), two steps."""
    from compiled_serve.models.loader import load_model

    loaded = load_model(model_dir, load_format=load_format, dtype=torch.float32, device="cpu", tp=(rank, world_size))
    return two_step_logits(loaded.module, prompts(), rank, world_size)


def listening_addresses(pids: list[int], states: tuple[str, ...] = ("0A",)) -> list[str]:
    """Local addresses ("127.0.0.1:port", ...) of every TCP socket the processes hold in one of
    `states` (/proc/net/tcp's codes: 0A listening, 01 established)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] not in states or fields[9] not in inodes:
                continue
            addr, port = fields[1].split(":")
            raw = bytes.fromhex(addr)
            if width == 8:
                host = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:
                host = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            found.append(f"{host}:{int(port, 16)}")
    return found
