"""Shared by the pass tests: capture a tiny real model's graph the way the pipeline does, run a
graph on fresh inputs, and build paged-attention metadata for a fresh cache."""

from __future__ import annotations

import copy
import functools
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from tiny_models import ours_from_hf, tiny_hf_model  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 16, 256


@functools.cache
def tiny_model(kind: str = "llama", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return ours_from_hf(tiny_hf_model(kind, num_hidden_layers=LAYERS), dtype=dtype).eval()


class _Captured(Exception):
    """Raised by the capturing backend: the graph is recorded and never run (inside a step the dense
    attention would refuse to)."""


@functools.cache
def _captured(kind: str, module: torch.nn.Module | None = None, dtype: torch.dtype = torch.float32,
              num_caches: int | None = None) -> tuple[torch.fx.GraphModule, list[Any]]:
    from compiled_serve.kernels.forward_context import forward_context
    from compiled_serve.passes.pipeline import step_entry_point

    graphs: list[tuple[torch.fx.GraphModule, list[Any]]] = []

    def grab(gm: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        graphs.append((gm, inputs))
        raise _Captured

    torch._dynamo.reset()
    model = module if module is not None else tiny_model(kind, dtype)
    step = torch.compile(step_entry_point(model), backend=grab, fullgraph=True, dynamic=True)
    try:
        caches = num_caches if num_caches is not None else count_attention_layers(model)
        with torch.no_grad(), forward_context(fresh_cache_metadata([5], num_layers=caches)):
            step(torch.arange(5), torch.arange(5))
    except torch._dynamo.exc.BackendCompilerFailed as e:
        if not isinstance(e.inner_exception, _Captured):
            raise
    assert len(graphs) == 1
    return graphs[0]


def count_attention_layers(model: torch.nn.Module) -> int:
    """One KV cache per decoder layer (`model.model.layers`); a model without layers gets none."""
    inner = getattr(model, "model", None)
    return len(getattr(inner, "layers", ())) if inner is not None else 0


def capture(kind: str = "llama", module: torch.nn.Module | None = None, dtype: torch.dtype = torch.float32,
            num_caches: int | None = None) -> tuple[torch.fx.GraphModule, list[Any]]:
    """A fresh copy of the pipeline's dynamo graph of `tiny_model(kind, dtype)` (or `module`), as the
    engine captures it (the step's KV caches, `num_caches` or one per decoder layer, are graph
    inputs), and its example inputs."""
    gm, inputs = _captured(kind, module, dtype, num_caches)
    return copy.deepcopy(gm), inputs


_CACHE_INPUT = re.compile(r"kv_caches_(\d+)_$")


def graph_inputs(gm: torch.fx.GraphModule, example: list[Any], ids: torch.Tensor,
                 positions: torch.Tensor) -> list[Any]:
    """The example inputs with the token inputs (and the symbolic token count) swapped for new ones,
    and the KV-cache inputs for the current forward context's caches when there is one."""
    from compiled_serve.kernels.forward_context import current_forward_context, in_forward_context

    caches = current_forward_context().kv_caches if in_forward_context() else None
    out = []
    for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example):
        cache = _CACHE_INPUT.search(node.name)
        if node.name.endswith("input_ids_"):
            value = ids
        elif node.name.endswith("positions_"):
            value = positions
        elif cache is not None and caches is not None:
            value = caches[int(cache.group(1))]
        elif isinstance(value, (int, torch.SymInt)):
            value = ids.shape[0]  # the only backed symbol: the caches' dims are static or unbacked
        out.append(value)
    return out


def assert_same_outputs(reference: torch.fx.GraphModule, rewritten: torch.fx.GraphModule, example: list[Any],
                        lengths: tuple[int, ...] = (7, 3), rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Both graphs, fed the same random tokens at random positions, agree (fp32, tight)."""
    gen = torch.Generator().manual_seed(1)
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=gen)
        positions = torch.randint(0, 60, (n,), generator=gen)
        with torch.no_grad():
            want = reference(*graph_inputs(reference, example, ids, positions))
            got = rewritten(*graph_inputs(rewritten, example, ids, positions))
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def op_count(gm: torch.fx.GraphModule, name: str) -> int:
    from compiled_serve.passes.base import count_ops

    return count_ops(gm).get(name, 0)


def fresh_cache_metadata(seq_tokens: list[int], num_blocks: int = 16, block_size: int = 4,
                         num_layers: int = LAYERS) -> Any:
    """Metadata for sequences prefilled from scratch into an empty cache, blocks laid out in order."""
    from compiled_serve.kernels.forward_context import AttentionMetadata

    caches = [torch.zeros(2, num_blocks, block_size, KV_HEADS, HEAD_DIM) for _ in range(num_layers)]
    slots, tables, qsl, nxt = [], [], [0], 0
    for n in seq_tokens:
        nb = -(-n // block_size)
        blocks = list(range(nxt, nxt + nb))
        nxt += nb
        tables.append(blocks + [0] * (4 - nb))
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(n)]
        qsl.append(qsl[-1] + n)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor(tables, dtype=torch.int32),
        seq_lens=torch.tensor(seq_tokens, dtype=torch.int32), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        max_query_len=max(seq_tokens), max_seq_len=max(seq_tokens), kv_caches=caches,
        seq_lens_host=list(seq_tokens), query_start_loc_host=qsl)
