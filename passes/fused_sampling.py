"""FusedSamplingPass: the whole logits tail (kernels/logits_tail.py) becomes one op.

Before (as dynamo captures `logits_tail`; the bitmask and penalty blocks are there only when given):
    raw = logits.float()                                            # [N, V] f32
    raw = compiled_serve.token_bitmask(raw, bitmask)                # grammar mask, -inf
    pen = rep[:, None]                                              # repetition (HF)
    p = torch.where(seen, torch.where(raw > 0, raw / pen, raw * pen), raw)
    p = p - freq[:, None] * counts                                  # frequency / presence (OpenAI)
    p = p - pres[:, None] * (counts > 0).float()
    g = greedy | (temperature <= 0)
    scaled = p / torch.where(g, 1.0, temperature)[:, None]
    probs = compiled_serve.sampling_filter(scaled, top_k, top_p, min_p).softmax(dim=-1)
    noise = compiled_serve.philox_exponential(seeds, offsets, g, V)
    token_ids = torch.where(g, p.argmax(dim=-1), (probs / noise).argmax(dim=-1))       # [N]
    logprobs = raw.log_softmax(dim=-1).gather(1, token_ids[:, None])[:, 0]          # [N]
After:
    out = compiled_serve.fused_sample(raw, temperature, top_k, top_p, min_p, seeds, offsets,
                                      greedy, rep, seen, freq, pres, counts, bitmask)
    token_ids, logprobs = out[0], out[1]

Every link is checked, operands included: the same `g` in both `where`s and in the noise, the
same temperature in `g` and in the divide, penalties in the op's order (repetition, then
frequency, then presence), noise as wide as the vocabulary, a float32 chain. A tail that
computes anything else (no temperature, another filter, another order) is left alone, and the
pass, required in the tail's pipeline, then fails the compile rather than sample from an unfused graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

import compiled_serve.kernels.fused_sampling  # noqa: F401  (registers fused_sample)
import compiled_serve.kernels.sampling_stages  # noqa: F401  (registers the stage ops)
import compiled_serve.kernels.token_bitmask  # noqa: F401  (registers token_bitmask)
from compiled_serve.passes.base import GraphPass, op_name
from compiled_serve.passes.dead_code import has_side_effects
from compiled_serve.passes.matching import arg, copy_meta, dims, kind, tensor_meta, value

FILTER_OP = "compiled_serve::sampling_filter"
NOISE_OP = "compiled_serve::philox_exponential"
FUSED_OP = "compiled_serve::fused_sample"
BITMASK_OP = "compiled_serve::token_bitmask"

# Spellings dynamo uses for the ops `kind()` does not fold (functions and tensor methods).
_FUNCTIONS: dict[str, tuple[Any, ...]] = {
    "where": (torch.where,),
    "argmax": (torch.argmax,),
    "softmax": (torch.softmax, torch.nn.functional.softmax),
    "log_softmax": (torch.log_softmax, torch.nn.functional.log_softmax),
    "gather": (torch.gather,),
    "gt": (operator.gt, torch.gt),
    "le": (operator.le, torch.le),
    "or": (operator.or_, torch.bitwise_or, torch.logical_or),
    "squeeze": (torch.squeeze,),
}
_METHODS: dict[str, tuple[str, ...]] = {
    "argmax": ("argmax",), "softmax": ("softmax",), "log_softmax": ("log_softmax",), "gather": ("gather",),
    "gt": ("gt", "__gt__"), "le": ("le", "__le__"), "or": ("__or__", "bitwise_or", "logical_or"),
    "squeeze": ("squeeze",),
}  # fmt: skip
_COLUMN = (slice(None), None)  # x[:, None]
_FIRST = (slice(None), 0)  # x[:, 0]


def is_op(node: Any, name: str) -> bool:
    """Whether `node` calls `name` in any dynamo spelling (function, method or the folded kind)."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_method":
        return node.target in _METHODS.get(name, ()) or kind(node) == name
    if node.op != "call_function":
        return False
    if name.startswith("compiled_serve::"):
        return op_name(node.target) == name
    return any(node.target is f for f in _FUNCTIONS.get(name, ())) or kind(node) == name


def _is_float32(node: Any) -> bool:
    t = tensor_meta(node)
    return t is not None and t.dtype == torch.float32


def _last_dim_reduction(node: Any, name: str) -> Any:
    """x for `x.<name>(dim=-1)` (argmax without keepdim, softmax without dtype); else None."""
    if not is_op(node, name) or set(node.kwargs) - {"dim", "input"} or len(node.args) > 2:
        return None
    x = arg(node, 0, "input")
    t = tensor_meta(x)
    dim = arg(node, 1, "dim")
    return x if t is not None and t.dim() == 2 and dim in (-1, 1) else None


def _column(node: Any) -> Any:
    """v for `v[:, None]`; else None."""
    if kind(node) == "getitem" and node.args[1] == _COLUMN:
        return node.args[0]
    return None


def _const(x: Any, number: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == number


def _product(node: Any) -> tuple[Any, Any] | None:
    """(v, x) for `v[:, None] * x` in either operand order; else None."""
    if kind(node) != "mul" or node.kwargs:
        return None
    a, b = node.args
    if _column(a) is not None:
        return _column(a), b
    if _column(b) is not None:
        return _column(b), a
    return None


@dataclass
class Penalties:
    repetition: Any = None  # [N] (with seen)
    seen: Any = None  # [N, V] bool
    frequency: Any = None  # [N] (with presence and counts)
    presence: Any = None
    counts: Any = None  # [N, V] float32

    def as_args(self) -> tuple[Any, ...]:
        return (self.repetition, self.seen, self.frequency, self.presence, self.counts)


def match_penalties(penalised: Any) -> tuple[Any, Penalties] | None:
    """(raw, penalties): peel presence, frequency, then repetition off the penalised logits."""
    found = Penalties()
    node = penalised
    # p - pres[:, None] * (counts > 0).float(), directly on p - freq[:, None] * counts
    if kind(node) == "sub" and not node.kwargs:
        outer_left, presence_term = node.args
        presence = _product(presence_term)
        if presence is None or kind(outer_left) != "sub" or outer_left.kwargs:
            return None
        inner_left, frequency_term = outer_left.args
        frequency = _product(frequency_term)
        if frequency is None:
            return None
        pres, indicator = presence
        freq, counts = frequency
        if not (kind(indicator) == "to" and _is_float32(indicator) and is_op(indicator.args[0], "gt")):
            return None
        gt = indicator.args[0]
        if gt.args[0] is not counts or not _const(gt.args[1], 0) or not _is_float32(counts):
            return None
        found.frequency, found.presence, found.counts = freq, pres, counts
        node = inner_left
    # torch.where(seen, torch.where(x > 0, x / pen, x * pen), x), pen = rep[:, None]
    if is_op(node, "where") and len(node.args) == 3 and not node.kwargs:
        seen, penalized, x = node.args
        if not (is_op(penalized, "where") and len(penalized.args) == 3 and not penalized.kwargs):
            return None
        positive, divided, multiplied = penalized.args
        if not (is_op(positive, "gt") and positive.args[0] is x and _const(positive.args[1], 0)):
            return None
        if kind(divided) != "div" or divided.args[0] is not x or divided.kwargs:
            return None
        penalty = divided.args[1]
        if kind(multiplied) != "mul" or multiplied.kwargs or set(multiplied.args) != {x, penalty}:
            return None
        repetition = _column(penalty)
        seen_meta = tensor_meta(seen)
        if repetition is None or seen_meta is None or seen_meta.dtype != torch.bool:
            return None
        found.repetition, found.seen = repetition, seen
        node = x
    return (node, found) if _is_float32(node) else None


@dataclass
class TailMatch:
    token_ids: torch.fx.Node
    logprobs: torch.fx.Node | None
    args: tuple[Any, ...]  # fused_sample's arguments, in its order


def match_tail(token_where: Any) -> TailMatch | None:
    """The fused_sample call equivalent to the tail ending in `token_where`, or None."""
    if not is_op(token_where, "where") or len(token_where.args) != 3 or token_where.kwargs:
        return None
    is_greedy, greedy_token, sampled = token_where.args
    # g = greedy | (temperature <= 0)
    if not is_op(is_greedy, "or") or len(is_greedy.args) != 2 or is_greedy.kwargs:
        return None
    greedy, non_positive = is_greedy.args
    if not (is_op(non_positive, "le") and _const(non_positive.args[1], 0)):
        return None
    temperature = non_positive.args[0]
    penalised = _last_dim_reduction(greedy_token, "argmax")
    race = _last_dim_reduction(sampled, "argmax")  # probs / noise
    if penalised is None or kind(race) != "div" or race.kwargs:
        return None
    probs, noise = race.args
    filtered = _last_dim_reduction(probs, "softmax")
    if not (is_op(filtered, FILTER_OP) and is_op(noise, NOISE_OP)):
        return None
    scaled, top_k, top_p, min_p = filtered.args
    seeds, offsets, skipped, width = noise.args
    if skipped is not is_greedy:  # noise skipped on other rows than the greedy ones
        return None
    # scaled = p / torch.where(g, 1.0, temperature)[:, None]
    if kind(scaled) != "div" or scaled.kwargs or scaled.args[0] is not penalised:
        return None
    divisor = _column(scaled.args[1])
    if not (is_op(divisor, "where") and divisor.args[0] is is_greedy and _const(divisor.args[1], 1.0)
            and divisor.args[2] is temperature):  # fmt: skip
        return None
    peeled = match_penalties(penalised)
    logits_meta = tensor_meta(penalised)
    if peeled is None or logits_meta is None or not _same_size(value(width), logits_meta.shape[-1]):
        return None
    masked, penalties = peeled
    raw, bitmask = masked, None
    if is_op(masked, BITMASK_OP) and len(masked.args) == 2 and not masked.kwargs and _is_float32(masked.args[0]):
        raw, bitmask = masked.args  # the op masks first; its logprobs are the masked row's
    args = (raw, temperature, top_k, top_p, min_p, seeds, offsets, greedy, *penalties.as_args(), bitmask)
    return TailMatch(token_where, _match_logprobs(token_where, masked), args)


def _same_size(a: Any, b: Any) -> bool:
    return isinstance(a, (int, torch.SymInt)) and isinstance(b, (int, torch.SymInt)) and dims((a,)) == dims((b,))


def _match_logprobs(token_ids: torch.fx.Node, raw: Any) -> torch.fx.Node | None:
    """`raw.log_softmax(dim=-1).gather(1, token_ids[:, None])[:, 0]` (or `.squeeze(1)`), or None."""
    for index in token_ids.users:
        if _column(index) is not token_ids:
            continue
        for gather in index.users:
            if not is_op(gather, "gather") or gather.kwargs or len(gather.args) != 3:
                continue
            source, dim, gathered = gather.args
            if dim not in (1, -1) or gathered is not index or _last_dim_reduction(source, "log_softmax") is not raw:
                continue
            for pick in gather.users:
                first = kind(pick) == "getitem" and pick.args[1] == _FIRST
                squeezed = is_op(pick, "squeeze") and len(pick.args) == 2 and pick.args[1] in (1, -1)
                if first or squeezed:
                    return pick
    return None


def _is_stage_op(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and op_name(node.target) in (FILTER_OP, NOISE_OP, FUSED_OP, BITMASK_OP)


class FusedSamplingPass(GraphPass):
    name = "fused-sampling"
    phase = "rewrite"
    required = True  # in the tail's pipeline: never sample from a graph this pass did not fuse
    uuid_modules = ("compiled_serve.passes.matching", "compiled_serve.passes.dead_code")

    def apply(self, gm: torch.fx.GraphModule) -> int:
        matches = 0
        graph = gm.graph
        for node in list(graph.nodes):
            found = match_tail(node)
            if found is None:
                continue
            with graph.inserting_before(found.token_ids):
                fused = graph.call_function(torch.ops.compiled_serve.fused_sample.default, found.args)
                token_ids = graph.call_function(operator.getitem, (fused, 0))
                logprobs = graph.call_function(operator.getitem, (fused, 1))
            copy_meta(token_ids, found.token_ids)
            logprob_value = value(found.logprobs) if found.logprobs is not None else None
            fused.meta["example_value"] = (value(found.token_ids), logprob_value)
            found.token_ids.replace_all_uses_with(token_ids)
            if found.logprobs is not None:
                copy_meta(logprobs, found.logprobs)
                found.logprobs.replace_all_uses_with(logprobs)
            matches += 1
        # The stage ops are pure; dead_code.has_side_effects keeps unknown compiled_serve ops.
        graph.eliminate_dead_code(is_impure_node=lambda n: has_side_effects(n) and not _is_stage_op(n))
        return matches
