"""TensorParallelPass: the captured graph of the whole model becomes one rank's share of it.

The model stays plain PyTorch at its full size; this pass shards it in the graph, by structure
(what feeds what), not by parameter names. For each parameter-weighted op, in graph order:

  embedding(ids, W[V, h])            vocab-parallel: rank r holds rows [r*V/N, (r+1)*V/N)
      -> local = ids - r*V/N; inside = 0 <= local < V/N
         e = embedding(clamp(local, 0, V/N - 1), W_r) * inside[:, None]
         e = wait(all_reduce(e, "sum"))                                    # [T, h]
  linear(x, Wqkv) -> split([q, kv, kv]) -> view(-1, H, D) / view(-1, KVH, D)
      column-parallel per section: W_r = [q_r; k_r; v_r] (models/tp_layout.py), the split sizes
      and head counts of the views become the rank's: view(-1, H/N, D), view(-1, KVH_r, D)
  linear(x, Wgu) -> chunk(2)        column-parallel per section: W_r = [gate_r; up_r]
      (or -> silu_and_mul, after the opt-in SiluMulPass)
  linear(x, W)  whose input comes from attention or from a gate/up output   (o_proj, down_proj)
      row-parallel: W_r = W[:, r*K/N:(r+1)*K/N]; y = wait(all_reduce(linear(x, W_r), "sum")) (+ bias)
  any other linear on a replicated input (lm_head, in the logits graph)
      column-parallel, gathered: y = all_gather(linear(x, W_r)) laid out back to [n, V]

so a decoder layer gets exactly two all-reduces, the embedding one, and the logits one gather.
The collectives are `torch.ops._c10d_functional` ops (what `torch.distributed._functional_collectives`
traces to), which Inductor schedules and fuses around; on the CPU they run on gloo, on CUDA on NCCL.

Where the shards come from: a weight placeholder that carries `tp_shard` (the rank's slice,
read from the checkpoint by models/tp_weights.py; the parameter itself is a memory-less
full-shape placeholder) is used as is, after a shape check; a real full weight is sliced here
(tests, and models loaded whole). The shards become buffers of the graph module.

Fails loudly (ShardingError / CompilationError): head counts or sizes that do not divide, an
attention whose q/k/v do not come from one packed projection, an op mixing a sharded value with
a replicated one, a memory-less weight without a shard. A "fixup" pass meant to run last: the
shapes it changes are not re-propagated into node metadata, so no pass after it may read them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from compiled_serve.errors import CompilationError
from compiled_serve.models.tp_layout import (
    Range,
    ShardingError,
    even_range,
    head_split,
    qkv_row_ranges,
    section_row_ranges,
)
from compiled_serve.passes.base import GraphPass, op_name
from compiled_serve.passes.graph_inputs import graph_input_value
from compiled_serve.passes.matching import arg, kind, last_dim

_LINEAR = (torch._C._nn.linear, F.linear)
_EMBEDDING = (F.embedding, torch.embedding)
_ATTENTION = ("compiled_serve::causal_attention", "compiled_serve::paged_attention")
_GATE_UP_OPS = ("compiled_serve::silu_and_mul",)  # SiluMulPass's op: takes the packed [gate | up] whole
_c10d = torch.ops._c10d_functional

COLUMN, ROW, GATHERED, VOCAB = "column", "row", "gathered", "vocab"


def graph_input_tensor(node: Any) -> torch.Tensor | None:
    """The real tensor dynamo lifted into a placeholder (a parameter or buffer), or None."""
    example = graph_input_value(node)
    return example if isinstance(example, torch.nn.Parameter) else None


def _is_memoryless(t: torch.Tensor) -> bool:
    return t.numel() > 1 and all(s == 0 for s in t.stride())


def _shape_args(node: torch.fx.Node) -> list[Any]:
    """The target shape of a view/reshape, however it was spelled: view(x, a, b) or view(x, (a, b))."""
    rest = list(node.args[1:])
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest


def _set_shape_args(node: torch.fx.Node, shape: list[Any]) -> None:
    node.args = (node.args[0], *shape) if node.op == "call_method" else (node.args[0], tuple(shape))


class TensorParallelPass(GraphPass):
    name = "tensor-parallel"
    phase = "fixup"
    required = True
    uuid_modules = ("compiled_serve.models.tp_layout",)

    def __init__(self, rank: int, world_size: int, group_name: str | None = None):
        if not (world_size >= 2 and 0 <= rank < world_size):
            raise CompilationError(f"tensor-parallel: rank {rank} of world size {world_size} is not a TP setup")
        self.rank, self.world_size, self.group_name = rank, world_size, group_name
        self.roles: dict[str, str] = {}  # weight placeholder name -> role (tests, --explain)
        self.shard_shapes: dict[str, tuple[int, ...]] = {}  # weight placeholder name -> shard shape

    # ------------------------------------------------------------------ driver
    def apply(self, gm: torch.fx.GraphModule) -> int:
        if self.group_name is None:
            import torch.distributed as dist

            self.group_name = dist.group.WORLD.group_name
        graph = gm.graph
        self._gm, self._roles_of_nodes = gm, {}
        matches = 0
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if node.target in _EMBEDDING and graph_input_tensor(arg(node, 1, "weight")) is not None:
                self._vocab_embedding(node)
                matches += 1
            elif node.target in _LINEAR and graph_input_tensor(arg(node, 1, "weight")) is not None:
                self._linear(node)
                matches += 1
        for node in graph.nodes:
            if node.op == "call_function" and op_name(node.target) in _ATTENTION:
                for a in node.args[:3]:
                    if self._source_role(a) != "qkv":
                        raise CompilationError(
                            f"{self.name}: attention {node.name} reads {getattr(a, 'name', a)}, which does not "
                            "come from a packed q/k/v projection; cannot shard its heads")
        return matches

    # ------------------------------------------------------------- analysis
    def _region(self, start: Any) -> tuple[set[str], list[torch.fx.Node]]:
        """Walk back from `start` to the nearest boundaries: "sharded" (an attention op, a
        column-parallel output), "replicated" (inputs, embeddings, reduced/gathered outputs).
        Returns the kinds met and the nodes walked through."""
        kinds: set[str] = set()
        walked: list[torch.fx.Node] = []
        stack, seen = [start], set()
        while stack:
            node = stack.pop()
            if not isinstance(node, torch.fx.Node) or node in seen:
                continue
            seen.add(node)
            role = self._roles_of_nodes.get(node)
            if node.op in ("placeholder", "get_attr") or role in ("replicated",):
                kinds.add("replicated")
                continue
            if role in ("qkv", "gate_up") or (node.op == "call_function" and op_name(node.target) in _ATTENTION):
                kinds.add("sharded")
                continue
            walked.append(node)
            stack.extend(a for a in node.all_input_nodes)
        return kinds, walked

    def _source_role(self, node: Any) -> str | None:
        """The role of the nearest parameter-weighted op upstream of `node` (qkv / gate_up / ...)."""
        stack, seen = [node], set()
        found: set[str] = set()
        while stack:
            n = stack.pop()
            if not isinstance(n, torch.fx.Node) or n in seen or n.op in ("placeholder", "get_attr"):
                continue
            seen.add(n)
            if n in self._roles_of_nodes:
                found.add(self._roles_of_nodes[n])
                continue
            stack.extend(n.all_input_nodes)
        return found.pop() if len(found) == 1 else None

    # ------------------------------------------------------------- rewrites
    def _linear(self, node: torch.fx.Node) -> None:
        x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
        kinds, walked = self._region(x)
        if kinds == {"sharded", "replicated"}:
            raise CompilationError(f"{self.name}: {node.name}'s input mixes sharded and replicated values")
        if "sharded" in kinds:
            self._row(node, x, w, b, walked)
            return
        users = list(node.users)
        if len(users) == 1 and kind(users[0]) == "split" and self._qkv(node, users[0], w, b):
            return
        halved = len(users) == 1 and kind(users[0]) == "chunk" and arg(users[0], 1, "chunks") == 2 \
            and last_dim(arg(users[0], 2, "dim", 0), node)
        fused = len(users) == 1 and users[0].op == "call_function" and op_name(users[0].target) in _GATE_UP_OPS
        if halved or fused:
            out = graph_input_tensor(w).shape[0]
            ranges = section_row_ranges([out // 2, out // 2], self.rank, self.world_size, f"{w.name} gate/up")
            self._replace_weight(node, 1, w, ranges, 0, "gate_up")
            self._replace_weight(node, 2, b, ranges, 0, None)
            self._roles_of_nodes[node] = "gate_up"
            return
        self._gathered(node, w, b)

    def _qkv(self, node: torch.fx.Node, split: torch.fx.Node, w: torch.fx.Node, b: Any) -> bool:
        sizes = arg(split, 1, "split_size_or_sections", arg(split, 1, "split_size"))
        if not isinstance(sizes, (list, tuple)) or len(sizes) != 3 or not last_dim(arg(split, 2, "dim", 0), node):
            return False
        views: list[torch.fx.Node] = []
        for i in range(3):
            getitems = [u for u in split.users if kind(u) == "getitem" and u.args[1] == i]
            vs = [v for g in getitems for v in g.users if kind(v) in ("view", "reshape")]
            if len(getitems) != 1 or len(vs) != 1 or len(_shape_args(vs[0])) != 3:
                raise CompilationError(f"{self.name}: {node.name} is split in three but part {i} is not viewed "
                                       "as [tokens, heads, head_dim]")
            views.append(vs[0])
        (_, heads, d), (_, kv_heads, dk), _ = (_shape_args(v) for v in views)
        if not all(isinstance(v, int) for v in (heads, kv_heads, d, dk)) or d != dk \
                or list(sizes) != [heads * d, kv_heads * d, kv_heads * d]:
            raise CompilationError(f"{self.name}: {node.name}'s split {list(sizes)} does not match its head views")
        s = head_split(heads, kv_heads, self.rank, self.world_size)
        ranges = qkv_row_ranges(heads, kv_heads, d, self.rank, self.world_size)
        self._replace_weight(node, 1, w, ranges, 0, "qkv")
        self._replace_weight(node, 2, b, ranges, 0, None)
        split.args = (split.args[0], [s.num_heads * d, s.num_kv_heads * d, s.num_kv_heads * d], *split.args[2:])
        for v, h in zip(views, (s.num_heads, s.num_kv_heads, s.num_kv_heads)):
            _set_shape_args(v, [-1, h, d])
        self._roles_of_nodes[node] = "qkv"
        return True

    def _row(self, node: torch.fx.Node, x: Any, w: torch.fx.Node, b: Any, walked: list[torch.fx.Node]) -> None:
        in_features = graph_input_tensor(w).shape[1]
        start, size = even_range(in_features, self.rank, self.world_size, f"{w.name} input dim")
        # A reshape back to the full width between the sharded op and this linear gets the rank's.
        for n in walked:
            if kind(n) in ("view", "reshape"):
                shape = _shape_args(n)
                if in_features in shape:
                    _set_shape_args(n, [size if d == in_features else d for d in shape])
        self._replace_weight(node, 1, w, [(start, size)], 1, ROW)
        graph = node.graph
        with graph.inserting_before(node.next):  # successive inserts land in order after `node`
            reduced = graph.call_function(_c10d.all_reduce.default, (node, "sum", self.group_name))
            last = out = graph.call_function(_c10d.wait_tensor.default, (reduced,))
            if b is not None:  # added once, after the sum
                node.args = (x, node.args[1], None) if len(node.args) > 2 else node.args
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
                last = graph.call_function(operator.add, (out, b))
        node.replace_all_uses_with(last, delete_user_cb=lambda u: u is not reduced)
        self._roles_of_nodes[last] = "replicated"

    def _gathered(self, node: torch.fx.Node, w: torch.fx.Node, b: Any) -> None:
        vocab = graph_input_tensor(w).shape[0]
        start, size = even_range(vocab, self.rank, self.world_size, f"{w.name} output dim (vocabulary)")
        self._replace_weight(node, 1, w, [(start, size)], 0, GATHERED)
        self._replace_weight(node, 2, b, [(start, size)], 0, None)
        n = self.world_size
        graph = node.graph
        with graph.inserting_before(node.next):
            gathered = graph.call_function(_c10d.all_gather_into_tensor.default, (node, n, self.group_name))
            waited = graph.call_function(_c10d.wait_tensor.default, (gathered,))
            # [N * rows, V/N] (rank-major) -> [rows, N, V/N] -> [rows, V]
            split = graph.call_method("view", (waited, n, -1, size))
            moved = graph.call_method("permute", (split, 1, 0, 2))
            out = graph.call_method("reshape", (moved, -1, n * size))
        node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not gathered)
        self._roles_of_nodes[out] = "replicated"

    def _vocab_embedding(self, node: torch.fx.Node) -> None:
        ids, w = arg(node, 0, "input"), arg(node, 1, "weight")
        vocab = graph_input_tensor(w).shape[0]
        start, size = even_range(vocab, self.rank, self.world_size, f"{w.name} vocabulary")
        dtype = graph_input_tensor(w).dtype
        graph = node.graph
        call: Callable[..., torch.fx.Node] = graph.call_function
        with graph.inserting_before(node):
            local = call(operator.sub, (ids, start))
            inside = call(operator.and_, (call(torch.ge, (local, 0)), call(torch.lt, (local, size))))
            safe = call(torch.clamp, (local, 0, size - 1))
        node.args = (safe, *node.args[1:]) if node.args else node.args
        if "input" in node.kwargs:
            node.kwargs = {**node.kwargs, "input": safe}
        self._replace_weight(node, 1, w, [(start, size)], 0, VOCAB)
        with graph.inserting_before(node.next):
            mask = graph.call_method("to", (graph.call_method("unsqueeze", (inside, -1)), dtype))
            masked = call(operator.mul, (node, mask))
            reduced = call(_c10d.all_reduce.default, (masked, "sum", self.group_name))
            out = call(_c10d.wait_tensor.default, (reduced,))
        node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not masked)
        self._roles_of_nodes[out] = "replicated"

    # ---------------------------------------------------------------- shards
    def _replace_weight(self, node: torch.fx.Node, index: int, param: Any, ranges: list[Range], dim: int,
                        role: str | None) -> None:
        """Swap `param` (argument `index` of `node`) for this rank's shard, as a module buffer."""
        full = graph_input_tensor(param)
        if full is None:
            if param is not None:
                raise CompilationError(f"{self.name}: {node.name}'s weight/bias is not a parameter")
            return
        shard = self._shard(param.name, full, ranges, dim)
        attr = f"tp_{param.name}"
        if not hasattr(self._gm, attr):
            self._gm.register_buffer(attr, shard, persistent=False)
            # AOT autograd maps every attribute of a dynamo graph to a source; a constant names the shard.
            sources = getattr(self._gm, "_param_name_to_source", None)
            if sources is not None:
                from torch._dynamo.source import ConstantSource

                sources[attr] = ConstantSource(attr)
        with node.graph.inserting_before(node):
            got = node.graph.get_attr(attr)
        names = ("input", "weight", "bias")
        if len(node.args) > index:
            node.args = (*node.args[:index], got, *node.args[index + 1:])
        else:
            node.kwargs = {**node.kwargs, names[index]: got}
        if role is not None:
            self.roles[param.name] = role
        self.shard_shapes[param.name] = tuple(shard.shape)

    def _shard(self, name: str, full: torch.Tensor, ranges: list[Range], dim: int) -> torch.Tensor:
        shape = list(full.shape)
        shape[dim] = sum(size for _, size in ranges)
        given = getattr(full, "tp_shard", None)
        if given is not None:
            if list(given.shape) != shape:
                raise ShardingError(f"{self.name}: {name} carries a shard of shape {tuple(given.shape)}, "
                                    f"rank {self.rank} of {self.world_size} needs {tuple(shape)}")
            return given
        if _is_memoryless(full):
            raise CompilationError(f"{self.name}: {name} is a placeholder that holds no values and carries "
                                   "no tp_shard; load the model per rank (models/tp_weights.py)")
        parts = [full.narrow(dim, start, size) for start, size in ranges]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim)).contiguous()
