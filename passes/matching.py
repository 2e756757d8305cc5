"""Reading fx nodes the way passes need: what op a node is, however the graph spells it.

Dynamo graphs spell one op several ways: `x * y` is `operator.mul`, `torch.mul` or the method
`x.mul(y)`; AOT graphs say `aten.mul.Tensor`. `kind(node)` folds them into one name ("mul"), so a
matcher reads `kind(n) == "mul"` instead of listing spellings. Shapes and dtypes come from the
fake tensor dynamo records on each node (`example_value`, or `val` on AOT graphs).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

_FUNCTIONS: dict[Any, str] = {
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
    operator.neg: "neg", torch.neg: "neg", operator.getitem: "getitem",
    torch.rsqrt: "rsqrt", torch.pow: "pow", torch.mean: "mean", torch.cat: "cat", torch.concat: "cat",
    torch.chunk: "chunk", torch.split: "split", torch.cos: "cos", torch.sin: "sin",
    torch.reshape: "reshape", torch.unsqueeze: "unsqueeze", F.silu: "silu", torch.flatten: "flatten",
}
_ATEN: dict[str, str] = {
    "add": "add", "sub": "sub", "mul": "mul", "div": "div", "neg": "neg", "rsqrt": "rsqrt",
    "pow": "pow", "mean": "mean", "cat": "cat", "chunk": "chunk", "split": "split",
    "split_with_sizes": "split", "cos": "cos", "sin": "sin", "view": "view", "reshape": "reshape",
    "unsqueeze": "unsqueeze", "silu": "silu", "_to_copy": "to", "clone": "clone",
}
_METHODS: dict[str, str] = {
    "add": "add", "sub": "sub", "mul": "mul", "div": "div", "neg": "neg", "rsqrt": "rsqrt",
    "pow": "pow", "mean": "mean", "chunk": "chunk", "split": "split", "cos": "cos", "sin": "sin",
    "view": "view", "reshape": "reshape", "unsqueeze": "unsqueeze", "contiguous": "contiguous",
    "to": "to", "float": "to", "half": "to", "bfloat16": "to", "double": "to", "type_as": "to",
    "type": "to", "flatten": "flatten",
}


def kind(node: Any) -> str | None:
    """The op's family name ("mul", "to", ...), or None for anything else (and for non-nodes)."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_method":
        return _METHODS.get(node.target)  # type: ignore[arg-type]
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return _ATEN.get(target._schema.name.split("::")[-1])
    try:
        return _FUNCTIONS.get(target)
    except TypeError:  # unhashable target
        return None


def arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument `index`/`name` of a call."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def value(node: Any) -> Any:
    """The fake value recorded for a node (a FakeTensor, SymInt, tuple...), or None."""
    if not isinstance(node, torch.fx.Node):
        return None
    return node.meta.get("val", node.meta.get("example_value"))


def tensor_meta(node: Any) -> torch.Tensor | None:
    val = value(node)
    return val if isinstance(val, torch.Tensor) else None


def dims(shape: Any) -> tuple[Any, ...]:
    """A shape whose symbolic sizes compare by expression (no guards are added)."""
    return tuple(d.node.expr if isinstance(d, torch.SymInt) else int(d) for d in shape)


def same_shape(a: Any, b: Any) -> bool:
    ta, tb = tensor_meta(a), tensor_meta(b)
    return ta is not None and tb is not None and dims(ta.shape) == dims(tb.shape)


def same_dtype_device(a: Any, b: Any) -> bool:
    ta, tb = tensor_meta(a), tensor_meta(b)
    return ta is not None and tb is not None and ta.dtype == tb.dtype and ta.device == tb.device


def known_contiguous(node: Any) -> bool:
    t = tensor_meta(node)
    return t is not None and statically_known_true(t.is_contiguous())


def strip_casts(node: Any) -> Any:
    """Walk up through dtype casts (`x.float()`, `x.to(dtype)`): the tensor that was cast."""
    while kind(node) == "to":
        node = node.args[0]
    return node


def is_const(x: Any, *values: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x in values


def binary_operands(node: torch.fx.Node) -> tuple[Any, Any]:
    return arg(node, 0, "input"), arg(node, 1, "other")


def other_operand(node: torch.fx.Node, one: Any) -> Any:
    """For a binary node with `one` as an operand, the other operand (None if `one` is not one)."""
    a, b = binary_operands(node)
    if a is one:
        return b
    if b is one:
        return a
    return None


def last_dim(dim: Any, node: Any) -> bool:
    """Whether `dim` names the last dimension of `node`'s tensor."""
    t = tensor_meta(node)
    return dim == -1 or (t is not None and dim == t.dim() - 1)


def halves(node: Any) -> tuple[Any, Any] | None:
    """`x1, x2` from `x1, x2 = x.chunk(2, -1)` (or an even `split`): returns (x, chunk_node)."""
    if kind(node) != "getitem" or kind(node.args[0]) not in ("chunk", "split"):
        return None
    return node.args[0].args[0], node.args[0]


def is_halving(split_node: torch.fx.Node) -> bool:
    """Whether a chunk/split node cuts its input into two equal halves along the last dim."""
    x = split_node.args[0]
    if kind(split_node) == "chunk":
        return arg(split_node, 1, "chunks") == 2 and last_dim(arg(split_node, 2, "dim", 0), x)
    sizes = arg(split_node, 1, "split_size_or_sections", arg(split_node, 1, "split_size"))
    t = tensor_meta(x)
    if not last_dim(arg(split_node, 2, "dim", 0), x) or t is None:
        return False
    width = t.shape[-1]
    if isinstance(sizes, (list, tuple)):
        return len(sizes) == 2 and sizes[0] == sizes[1]
    return isinstance(sizes, int) and isinstance(width, int) and 2 * sizes == width


def getitem_user(node: torch.fx.Node, index: int) -> torch.fx.Node | None:
    for user in node.users:
        if kind(user) == "getitem" and user.args[1] == index:
            return user
    return None


def order(graph: torch.fx.Graph) -> dict[torch.fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def copy_meta(new: torch.fx.Node, old: torch.fx.Node) -> None:
    """Carry the source location (for readable dumps) and the fake value over to `new`."""
    new.meta.update({k: v for k, v in old.meta.items() if k in ("stack_trace", "nn_module_stack",
                                                               "val", "example_value")})
