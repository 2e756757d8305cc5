"""A tensor-parallel worker: one process per rank > 0, started by rank 0 (engine/tp_engine.py).

    python -m compiled_serve.engine.tp_worker --rank R --world-size N --store PATH [--record-build]  < config.json

It reads the EngineConfig as JSON on stdin (never pickle), joins the process group through the
FileStore at PATH, loads only its shards, compiles the same sharded step as rank 0, and then
mirrors rank 0's steps (tp_protocol.py) until STOP. It dies with its parent (PR_SET_PDEATHSIG,
and a watchdog on the parent pid), so a crashed engine leaves no worker behind.

Builds (build/tp_builds.py): with `build_dir` set it loads its own rank's build before its first
compile (and, on STATUS, says what it loaded and compiled in `build.R` beside the store); with --record-build (`compile`) it
compiles in a fresh Inductor cache while torch records, and saves its build on SAVE_BUILD. An error
that stops it is written to `error.R` ({"kind", "message"}) for rank 0 to raise.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from compiled_serve.engine.tp_network import apply_socket_env

logger = logging.getLogger("compiled_serve.engine")

#: How long a collective may wait for a peer before it fails (a hung rank is an error, not a hang).
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


def die_with_parent() -> None:
    parent = os.getppid()
    try:  # Linux: the kernel kills us when the parent exits
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="tp-parent-watch").start()


def init_group(rank: int, world_size: int, store_path: str, device: torch.device,
               interface: str) -> dict[str, str | None]:
    """Joins the process group; returns the socket variables as they were before (tp_network.py)."""
    # gloo's / NCCL's sockets on `interface` (EngineConfig.distributed_interface, loopback by
    # default). No TCP store at all: the rendezvous is a file in a private directory.
    before = apply_socket_env(interface)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.FileStore(store_path, world_size), rank=rank,
                            world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    # Every rank's connections complete before any rank goes on (and may fail, e.g. loading):
    # a rank that left mid-handshake would fail the others' rendezvous with a confusing error.
    dist.barrier()
    return before


def config_from_json(text: str):  # -> EngineConfig
    from compiled_serve.config import EngineConfig

    raw = json.loads(text)
    for name in ("extra_passes", "disabled_passes", "cuda_graph_buckets"):
        if isinstance(raw.get(name), list):
            raw[name] = tuple(raw[name])
    return EngineConfig(**raw)


@contextlib.contextmanager
def recording_rank_build(rank: int):
    """`compile`: an empty Inductor cache of this rank's own (a path that depends on the build's
    inputs alone, as `fresh_inductor_cache`'s does: torch writes it into its artifacts), and torch
    recording what this process compiles."""
    import tempfile

    from compiled_serve.cache.inductor_artifacts import recording_compile_artifacts

    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "compiled-serve-build")
    root = f"{base}-rank{rank}"
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = root
    try:
        with recording_compile_artifacts():
            yield
    finally:
        shutil.rmtree(root, ignore_errors=True)


@torch.inference_mode()
def serve_rank(rank: int, world_size: int, store_path: str, config) -> None:
    from compiled_serve.build.tp_builds import open_rank_build, rank_build_key, save_rank_build
    from compiled_serve.engine import tp_protocol as proto
    from compiled_serve.engine.cuda_graphs import DecodeGraphs, measure_capture_bytes
    from compiled_serve.engine.device import resolve_device, resolve_dtype
    from compiled_serve.engine.kv_cache import allocate_kv_cache
    from compiled_serve.kernels.forward_context import AttentionMetadata, forward_context
    from compiled_serve.models.loader import load_model
    from compiled_serve.models.tp_layout import head_split
    from compiled_serve.passes.pipeline import compile_model
    from compiled_serve.passes.registry import default_pass_manager
    from compiled_serve.passes.tp_pipeline import compile_logits, with_tensor_parallel

    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dtype = resolve_dtype(config.dtype, device)
    open(os.path.join(os.path.dirname(store_path), f"joining.{rank}"), "w").close()  # rank 0 waits for it
    init_group(rank, world_size, store_path, device, config.distributed_interface)
    loaded = load_model(config.model, load_format=config.load_format, dtype=dtype, device=device,
                        seed=config.seed, tp=(rank, world_size))
    mc = loaded.config
    manager = with_tensor_parallel(default_pass_manager(extra=list(config.extra_passes),
                                                        disabled=list(config.disabled_passes),
                                                        device=device.type), rank, world_size)
    here = os.path.dirname(store_path)
    key = rank_build_key(config, mc, loaded.weight_fingerprint, manager, dtype, device, rank, world_size)
    status = open_rank_build(config, key, None)  # raises if this rank's build is refused
    build_message = status.message if status is not None else "no build_dir (compiled)"
    step_fn, step_report = compile_model(loaded.module, mode=config.compile_mode, passes=manager)
    logits_fn, _ = compile_logits(loaded.module, rank, world_size, mode=config.compile_mode)
    kv_heads = head_split(mc.num_heads, mc.num_kv_heads, rank, world_size).num_kv_heads
    caches: list[torch.Tensor] = []
    graph_sets: dict[int, DecodeGraphs] = {}  # GRAPH_KINDS index -> the set rank 0 mirrors
    host_lists = device.type != "cuda"
    while True:
        op, a, b, c, d, e, f, _ = proto.receive_header(device)
        if op == proto.STOP:
            return
        if op == proto.SETUP:
            caches = allocate_kv_cache(mc.num_layers, a, config.block_size, kv_heads, mc.head_dim, dtype, device)
        elif op == proto.STEP:
            payload = torch.empty(proto.step_payload_len(a, b, c), dtype=torch.int64, device=device)
            dist.broadcast(payload, src=0)
            t = proto.unpack_step(payload, a, b, c)
            meta = AttentionMetadata(
                slot_mapping=t["slot_mapping"], block_tables=t["block_tables"], seq_lens=t["seq_lens"],
                query_start_loc=t["query_start_loc"], max_query_len=d, max_seq_len=e, kv_caches=caches,
                seq_lens_host=t["seq_lens"].tolist() if host_lists else None,
                query_start_loc_host=t["query_start_loc"].tolist() if host_lists else None)
            with forward_context(meta):
                step_fn(t["input_ids"].clone(), t["positions"].clone())
        elif op == proto.LOGITS:
            rows = torch.empty((a, b), dtype=dtype, device=device)
            dist.broadcast(rows, src=0)
            logits_fn(rows)  # joins the vocabulary gather; rank 0 samples
        elif op == proto.MEASURE:
            measure_capture_bytes(step_fn, mc.num_layers, config.block_size, kv_heads, mc.head_dim, dtype, a, b, device)
        elif op == proto.GRAPHS:  # a, b, c, d, e: kind, max_blocks, max_seq_len, seq_capacity, query_len
            buckets = torch.empty(f, dtype=torch.int64, device=device)  # f: how many buckets
            dist.broadcast(buckets, src=0)
            pool = graph_sets[1].pool if a == 0 and 1 in graph_sets else None  # decode shares mixed's pool
            graphs = DecodeGraphs(step_fn, caches, buckets.tolist(), b, c, device, query_len=e or None,
                                  seq_capacity=d, pool=pool)
            graphs.capture_all()  # in step with rank 0's capture: its warm-up and replays meet ours
            graph_sets[a] = graphs
        elif op == proto.REPLAY:
            graphs = graph_sets[a]
            for buffer in graphs.replay_inputs(b, c):
                dist.broadcast(buffer, src=0)
            graphs.launch(b)  # joins the collectives inside the graph; rank 0 reads the hidden rows
        elif op == proto.STATUS:  # after rank 0's warm-up: what this rank loaded, and what it compiled
            from torch._dynamo.utils import counters

            hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
            generated = f"; Inductor: {hits} graph(s) from cache, {misses} generated" \
                if config.compile_mode == "inductor" else ""
            with open(os.path.join(here, f"build.{rank}"), "w") as f:
                f.write(build_message + generated)
            dist.barrier()
        elif op == proto.SAVE_BUILD:
            path = torch.empty(a, dtype=torch.uint8, device=device)
            dist.broadcast(path, src=0)
            try:
                answer = save_rank_build(os.fsdecode(bytes(path.cpu().tolist())), key, step_report, rank)
            except Exception as exc:  # noqa: BLE001  (rank 0 raises it; this rank can still step)
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            with open(os.path.join(here, f"saved.{rank}"), "w") as f:
                json.dump(answer, f)
            dist.barrier()
        else:
            raise RuntimeError(f"tensor-parallel worker {rank}: unknown op {op}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="compiled_serve.engine.tp_worker")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--record-build", action="store_true", help="record this rank's build (compile)")
    args = parser.parse_args(argv)
    die_with_parent()
    logging.basicConfig(level=logging.WARNING, format=f"[tp rank {args.rank}] %(levelname)s %(message)s")
    config = config_from_json(sys.stdin.read())
    try:
        with recording_rank_build(args.rank) if args.record_build else contextlib.nullcontext():
            serve_rank(args.rank, args.world_size, args.store, config)
    except Exception as exc:
        with open(os.path.join(os.path.dirname(args.store), f"error.{args.rank}"), "w") as f:
            json.dump({"kind": type(exc).__name__, "message": str(exc)}, f)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
