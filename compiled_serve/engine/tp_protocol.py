"""What rank 0 tells the tensor-parallel workers, as torch.distributed broadcasts (never pickle).

Every message is a fixed int64 header [op, a, b, c, d, e, f, 0] broadcast from rank 0, then, for some
ops, one payload tensor whose shape the header gives:

  SETUP   [SETUP, num_blocks]                                  the KV-cache size rank 0 chose
  STEP    [STEP, T, S, W, max_query_len, max_seq_len]          then int64 [3T + 2S + 1 + S*W]:
          input_ids [T] | positions [T] | slot_mapping [T] | seq_lens [S] | query_start_loc [S+1]
          | block_tables [S, W]
  LOGITS  [LOGITS, n, hidden]                                  then the n hidden rows [n, hidden]
          rank 0 samples from (the hidden state is the same on every rank after the all-reduce)
  SAVE_BUILD [SAVE_BUILD, n]                                   then uint8 [n]: a build directory (utf-8);
          each worker saves its recorded build there (build/tp_builds.py), answers in a file
          `saved.R` beside the store, and joins a barrier
  MEASURE [MEASURE, bucket, max_seq_len]                       every rank runs measure_capture_bytes
  GRAPHS  [GRAPHS, kind, max_blocks, max_seq_len, seq_capacity, query_len (0: None), nb]
          then int64 [nb] buckets: the workers build this DecodeGraphs set (kind: an index
          into GRAPH_KINDS) and capture it, as rank 0 does at the same time
  REPLAY  [REPLAY, kind, bucket, rows]                          then, into the set's static buffers:
          input_ids [bucket] | positions [bucket] | slot_mapping [bucket] | meta32 | block_tables
          [rows] (DecodeGraphs.replay_inputs); every rank replays the bucket's graph
  STATUS  [STATUS]                                             each worker writes `build.R` (its build
          and its Inductor cache hits/misses so far) beside the store, then a barrier
  STOP    [STOP]                                               the workers exit

Nothing comes back: every rank runs the step and joins the collectives inside the compiled graph;
rank 0 alone samples, so the sampled ids never leave it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SETUP, STEP, LOGITS, STOP, SAVE_BUILD, MEASURE, GRAPHS, REPLAY, STATUS = 1, 2, 3, 4, 5, 6, 7, 8, 9
GRAPH_KINDS = ("decode", "mixed")
HEADER_LEN = 8


def broadcast_header(values: list[int], device: torch.device) -> None:
    # Built on the host, pinned, and copied without a sync: a pageable copy would wait for the
    # stream, so rank 0 could not enqueue a step while the previous one runs (async scheduling).
    host = torch.zeros(HEADER_LEN, dtype=torch.int64, pin_memory=device.type == "cuda")
    host[: len(values)] = torch.tensor(values, dtype=torch.int64)
    dist.broadcast(host.to(device, non_blocking=True), src=0)


def receive_header(device: torch.device) -> list[int]:
    header = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
    dist.broadcast(header, src=0)
    return header.tolist()


def pack_step(ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor,
              query_start_loc: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.int64) for t in (ids, positions, slots, seq_lens, query_start_loc,
                                                               block_tables)])


def unpack_step(payload: torch.Tensor, num_tokens: int, num_seqs: int, width: int) -> dict[str, torch.Tensor]:
    t, s = num_tokens, num_seqs
    sizes = [t, t, t, s, s + 1, s * width]
    ids, pos, slots, lens, qsl, tables = payload.split(sizes)
    return {"input_ids": ids, "positions": pos, "slot_mapping": slots, "seq_lens": lens.to(torch.int32),
            "query_start_loc": qsl.to(torch.int32), "block_tables": tables.view(s, width).to(torch.int32)}


def step_payload_len(num_tokens: int, num_seqs: int, width: int) -> int:
    return 3 * num_tokens + 2 * num_seqs + 1 + num_seqs * width
