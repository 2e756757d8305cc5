"""Rank 0 of a tensor-parallel engine: starts the workers, and mirrors every step to them.

The engine (scheduler, block manager, persistent batch, sampler) runs once, in the engine's own
process, which is also rank 0. `TensorParallelDriver`:
  - starts one worker process per rank > 0 (`python -m compiled_serve.engine.tp_worker`, the
    EngineConfig as JSON on stdin), rendezvous through a FileStore in a private temp directory
    (no TCP store), gloo (CPU) or NCCL (CUDA) sockets on `distributed_interface`, loopback by
    default (tp_network.py). This traffic is unauthenticated: loopback, or a private network.
  - loads rank 0's shards and adds TensorParallelPass to the engine's pass list;
  - wraps the compiled step: before rank 0 runs it, the step's inputs are broadcast to the
    workers (tp_protocol.py), who run the same step, so the collectives in the graph meet;
  - replaces `compute_logits` with the sharded logits graph (vocabulary gather), after telling
    the workers which hidden rows to join with;
  - checks before every broadcast that every worker is alive. A dead worker (or a failed
    collective) raises `TensorParallelWorkerError`; the engine is then failed for good.
  - `shutdown()` (also at exit and when the engine is collected) stops and reaps every worker.
  - CUDA graphs (cuda_graphs.py): the graphs capture the bare step (the collectives in it are
    NCCL's, which a graph captures); the broadcast of the inputs stays outside. When rank 0 sets
    up a graph set (`mirror_graphs`), every worker builds and captures the same set, in step;
    before each replay rank 0 broadcasts its static buffers straight into the workers' (GRAPHS,
    REPLAY), and every rank replays the same bucket. `measure_capture_bytes` runs on every rank.
  - TP=1 (`distributed_executor_backend="mp"`): no worker, a process group of one, and every
    message and broadcast of this path still made: what W3 measures against the in-process
    engine. The graph is the unsharded one (as vLLM skips collectives over one rank).
  - builds (build/tp_builds.py): each worker loads its own rank's build from `build_dir`; under
    `compile` (`recording_worker_builds`) the workers record theirs and save it on SAVE_BUILD.
    A worker that fails writes its error to `error.R` beside the store; rank 0 raises it (a
    refused build as the `BuildRefusedError` it is).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from compiled_serve.build.loading import BuildMismatchError, BuildRefusedError
from compiled_serve.build.tp_builds import tp_key_fields, workers_record_builds
from compiled_serve.config import EngineConfig
from compiled_serve.engine import tp_protocol as proto
from compiled_serve.engine.cuda_graphs import DecodeGraphs, measure_capture_bytes
from compiled_serve.engine.tp_network import restore_socket_env, socket_env, warn_if_not_loopback
from compiled_serve.errors import CompiledServeError, InvalidParameterError
from compiled_serve.kernels.forward_context import current_forward_context
from compiled_serve.models.tp_layout import ShardingError, head_split

logger = logging.getLogger("compiled_serve.engine")


class TensorParallelWorkerError(CompiledServeError):
    """A tensor-parallel worker died or a collective failed: the engine cannot step any more."""


WORKER_MODULE = "compiled_serve.engine.tp_worker"
#: How long rank 0 waits for every worker to reach the rendezvous (interpreter and torch import).
JOIN_TIMEOUT_S = 120.0
#: After a failed collective, how long rank 0 waits for the worker that caused it to exit (so the
#: error names that worker and its own error, not just "a collective failed").
EXIT_GRACE_S = 5.0
#: The errors a worker's `error.R` may name that rank 0 raises as themselves.
_WORKER_ERRORS: dict[str, type[CompiledServeError]] = {"BuildMismatchError": BuildMismatchError,
                                                       "BuildRefusedError": BuildRefusedError}


class TensorParallelDriver:
    def __init__(self, config: EngineConfig, device: torch.device):
        from compiled_serve.engine.tp_worker import init_group

        self.config, self.size, self.device = config, config.tensor_parallel_size, device
        if dist.is_initialized():
            raise InvalidParameterError("tensor_parallel_size", "this process already has a torch.distributed "
                                        "process group; a tensor-parallel engine needs its own process")
        self._dir = tempfile.mkdtemp(prefix="compiled-serve-tp-")  # 0700: the rendezvous file lives here
        store = os.path.join(self._dir, "store")
        sockets = socket_env(config.distributed_interface)  # checked before any worker starts
        warn_if_not_loopback(config.distributed_interface)
        env = {**os.environ, **sockets}
        if device.type == "cpu":  # ranks share the cores; each its share of threads
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.size)))
        text = json.dumps(dataclasses.asdict(config))
        record = ["--record-build"] if workers_record_builds() else []
        self.workers: list[subprocess.Popen] = []
        for rank in range(1, self.size):
            proc = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, "--rank", str(rank),
                 "--world-size", str(self.size), "--store", store, *record], stdin=subprocess.PIPE, env=env)
            assert proc.stdin is not None
            proc.stdin.write(text.encode())
            proc.stdin.close()
            self.workers.append(proc)
        self.failed: str | None = None
        self._socket_env_before: dict[str, str | None] | None = None
        self._finalizer = weakref.finalize(self, _reap, self.workers, self._dir)
        try:
            self._wait_for_workers()
            self._socket_env_before = init_group(0, self.size, store, device, config.distributed_interface)
        except Exception:
            self.shutdown()
            raise
        logger.info("tensor parallel: %d ranks (%s), workers %s", self.size, dist.get_backend(),
                    [p.pid for p in self.workers])

    def _wait_for_workers(self) -> None:
        """Until every worker has said it is joining (a file `joining.R` beside the store): a worker
        that dies before the rendezvous is an error now, not a rendezvous timeout later."""
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        waiting = dict(enumerate(self.workers, start=1))
        while waiting:
            for rank, proc in list(waiting.items()):
                if os.path.exists(os.path.join(self._dir, f"joining.{rank}")):
                    del waiting[rank]
                elif proc.poll() is not None:
                    self.failed = f"tensor-parallel worker rank {rank} exited with code {proc.returncode} before joining"
                    raise TensorParallelWorkerError(self.failed + self._worker_error_text(rank))
            if waiting and time.monotonic() > deadline:
                raise TensorParallelWorkerError(f"tensor-parallel workers {sorted(waiting)} did not start in "
                                                f"{JOIN_TIMEOUT_S:.0f} s")
            time.sleep(0.05)

    # ------------------------------------------------------------ set-up
    def load_model(self, dtype: torch.dtype) -> Any:
        from compiled_serve.models.loader import load_model

        c = self.config
        try:
            return load_model(c.model, load_format=c.load_format, dtype=dtype, device=self.device, seed=c.seed,
                              tokenizer=c.tokenizer, tp=(0, self.size))
        except ShardingError as e:
            self.shutdown()
            raise InvalidParameterError("tensor_parallel_size", str(e)) from e
        except Exception:
            self.shutdown()
            raise

    def pass_manager(self, manager: Any) -> Any:
        from compiled_serve.passes.tp_pipeline import with_tensor_parallel

        return with_tensor_parallel(manager, 0, self.size) if self.size > 1 else manager

    def kv_heads(self, model_config: Any) -> int:
        if self.size == 1:
            return model_config.num_kv_heads
        return head_split(model_config.num_heads, model_config.num_kv_heads, 0, self.size).num_kv_heads

    def key(self) -> dict[str, int]:
        """What the build key adds: a build is per TP size and rank (TP=1: the in-process key,
        whose graphs are the same)."""
        return tp_key_fields(0, self.size)

    def setup(self, num_blocks: int) -> None:
        self._send([proto.SETUP, num_blocks])

    # ------------------------------------------------------------ CUDA graphs
    def measure_capture_bytes(self, _wrapped_step: Callable, num_layers: int, block_size: int, num_kv_heads: int,
                              head_dim: int, dtype: torch.dtype, bucket: int, max_seq_len: int,
                              device: torch.device) -> int:
        """`cuda_graphs.measure_capture_bytes` on every rank at once (its warm-up and replay run the
        step's collectives); rank 0's figure sizes the KV cache, which SETUP then gives everyone."""
        self._send([proto.MEASURE, bucket, max_seq_len])
        # Unguarded: an out-of-memory error here is the user's to see as such, not a "collective failed".
        return measure_capture_bytes(self.raw_step, num_layers, block_size, num_kv_heads, head_dim, dtype, bucket,
                                     max_seq_len, device)

    def mirror_graphs(self, graphs: DecodeGraphs, kind: str) -> None:
        """Rank 0 is about to capture `graphs` (ModelRunner.on_new_graphs): the workers build the
        same set and capture it alongside; each of rank 0's replays is mirrored from now on."""
        code = proto.GRAPH_KINDS.index(kind)
        buckets = torch.tensor(list(graphs.buckets), dtype=torch.int64).to(self.device)
        self._send([proto.GRAPHS, code, graphs.max_blocks_per_seq, graphs.max_seq_len, graphs.seq_capacity,
                    graphs.query_len or 0, len(graphs.buckets)], buckets)

        def before_replay(bucket: int, rows: int) -> None:
            self._send([proto.REPLAY, code, bucket, rows])
            for buffer in graphs.replay_inputs(bucket, rows):
                self._guarded(dist.broadcast, buffer, 0)

        graphs.before_replay = before_replay

    def worker_build_messages(self) -> list[str]:
        """What each worker did with its build ("rank 1: build ab12.. loaded: 1 artifacts; Inductor:
        4 graph(s) from cache, 0 generated"), asked once rank 0's warm-up is done."""
        self._send([proto.STATUS])
        self._guarded(dist.barrier)
        out = []
        for rank in range(1, self.size):
            path = os.path.join(self._dir, f"build.{rank}")
            if os.path.exists(path):
                with open(path) as f:
                    out.append(f"rank {rank}: {f.read().strip()}")
        return out

    def save_worker_builds(self, out_dir: str) -> list[dict[str, Any]]:
        """`compile`: every worker saves the build it recorded into `out_dir`; their answers
        (rank, path, key, manifest_hash), or a `TensorParallelWorkerError` naming what failed."""
        path = os.fsencode(os.path.abspath(out_dir))
        for rank in range(1, self.size):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self._dir, f"saved.{rank}"))
        self._send([proto.SAVE_BUILD, len(path)], torch.frombuffer(bytearray(path), dtype=torch.uint8).to(self.device))
        self._guarded(dist.barrier)
        answers = []
        for rank in range(1, self.size):
            with open(os.path.join(self._dir, f"saved.{rank}")) as f:
                answer = json.load(f)
            if "error" in answer:
                raise TensorParallelWorkerError(f"tensor-parallel worker rank {rank} could not save its build: "
                                                f"{answer['error']}")
            answers.append(answer)
        return answers

    def wrap(self, model: torch.nn.Module, step_fn: Callable) -> Callable:
        """The step that mirrors itself to the workers; `model.compute_logits` becomes the sharded one."""
        from compiled_serve.passes.tp_pipeline import compile_logits

        self.raw_step = step_fn  # what CUDA graphs capture (the broadcast stays outside them)
        if self.size > 1:
            logits_fn, self.logits_report = compile_logits(model, 0, self.size, mode=self.config.compile_mode)
        else:
            logits_fn = type(model).compute_logits.__get__(model)  # the unsharded one

        def step(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            meta = current_forward_context()
            tables = meta.block_tables
            self._send([proto.STEP, input_ids.shape[0], meta.seq_lens.shape[0], tables.shape[1],
                        meta.max_query_len, meta.max_seq_len],
                       proto.pack_step(input_ids, positions, meta.slot_mapping, meta.seq_lens,
                                       meta.query_start_loc, tables))
            return step_fn(input_ids, positions)

        def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
            rows = hidden.contiguous()
            self._send([proto.LOGITS, rows.shape[0], rows.shape[1]], rows)
            return self._guarded(logits_fn, rows)

        model.compute_logits = compute_logits  # type: ignore[method-assign]
        return lambda ids, pos: self._guarded(step, ids, pos)

    # ------------------------------------------------------------ messages
    def _send(self, header: list[int], payload: torch.Tensor | None = None) -> None:
        self.check_alive()
        self._guarded(proto.broadcast_header, header, self.device)
        if payload is not None:
            self._guarded(dist.broadcast, payload, 0)

    def _guarded(self, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except TensorParallelWorkerError:
            raise
        except (RuntimeError, dist.DistError) as e:  # a peer went away mid-collective
            self._wait_for_an_exit(EXIT_GRACE_S)
            self.check_alive()
            self.failed = f"a tensor-parallel collective failed: {e}"
            self._finalizer()
            raise TensorParallelWorkerError(self.failed) from e

    def _wait_for_an_exit(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.workers and time.monotonic() < deadline and all(p.poll() is None for p in self.workers):
            time.sleep(0.05)

    def _worker_error(self, rank: int) -> dict[str, str] | None:
        """What a failed worker wrote to `error.R` ({"kind": class name, "message": text}), if anything."""
        try:
            with open(os.path.join(self._dir, f"error.{rank}")) as f:
                found = json.load(f)
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) else None

    def _worker_error_text(self, rank: int) -> str:
        found = self._worker_error(rank)
        return f": {found.get('kind')}: {found.get('message')}" if found else " (its error is on stderr)"

    def check_alive(self) -> None:
        if self.failed is None:
            for rank, proc in enumerate(self.workers, start=1):
                code = proc.poll()
                if code is not None:
                    found = self._worker_error(rank)
                    self.failed = (f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with code {code}"
                                   + self._worker_error_text(rank))
                    error = _WORKER_ERRORS.get(found.get("kind", "")) if found else None
                    if error is not None:  # the worker's own typed error, as rank 0's would be
                        self._finalizer()
                        raise error(f"tensor-parallel rank {rank}: {found.get('message')}")
                    break
        if self.failed is not None:
            self._finalizer()  # the other workers are of no use now: kill and reap them (no zombies)
            raise TensorParallelWorkerError(self.failed + "; the engine must be restarted")

    def shutdown(self) -> None:
        """Stops every worker (STOP if they can still hear it, then a kill) and leaves nothing behind."""
        if self.failed is None and all(p.poll() is None for p in self.workers) and dist.is_initialized():
            try:
                proto.broadcast_header([proto.STOP], self.device)
                for proc in self.workers:
                    proc.wait(timeout=10)
            except Exception:  # noqa: BLE001  (a worker died or hung meanwhile: the kill below reaps it)
                pass
        self.failed = self.failed or "the engine was shut down"
        self._finalizer()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._socket_env_before is not None:  # the group is gone: GLOO/NCCL_SOCKET_IFNAME as they were
            restore_socket_env(self._socket_env_before)
            self._socket_env_before = None


def _reap(workers: list[subprocess.Popen], directory: str) -> None:
    """Kills what is still running and waits for it (no zombies); removes the rendezvous dir."""
    for proc in workers:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    shutil.rmtree(directory, ignore_errors=True)
