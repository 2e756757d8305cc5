"""Regional compilation (passes/layer_regions.py): the split's order, one compile per distinct layer,
the stitched pieces computing what the whole graph computes, and the cases compiled whole."""

from __future__ import annotations

import contextlib
import copy

import pass_testing
import pytest
import torch
from pass_testing import graph_inputs, ours_from_hf, tiny_hf_model

from compiled_serve.kernels.forward_context import forward_context
from compiled_serve.passes.graph_inputs import attach_example_inputs, detach_example_inputs
from compiled_serve.passes.layer_regions import compile_by_layer, layer_partitions
from compiled_serve.passes.pipeline import compile_model, whole_graph_compile
from compiled_serve.passes.registry import default_pass_manager

LAYERS = 6  # the first and last layers differ from the middle ones: enough of those to share


def _model(kind: str = "llama") -> torch.nn.Module:
    return ours_from_hf(tiny_hf_model(kind, num_hidden_layers=LAYERS)).eval()


_MODELS = {kind: _model(kind) for kind in ("llama",)}


def rewritten(kind: str = "llama") -> tuple[torch.fx.GraphModule, list]:
    """The tiny model's step graph after the default passes, as the backend hands it to Inductor."""
    gm, example = pass_testing.capture(kind, module=_MODELS.setdefault(kind, _model(kind)))
    attach_example_inputs(gm, example)
    try:
        default_pass_manager()(gm)
    finally:
        detach_example_inputs(gm)
    return gm, example


def _layer_node(gm: torch.fx.GraphModule, layer: int) -> torch.fx.Node:
    """One layer's last linear (its MLP's down projection): an op with one tensor out."""
    return [n for n in gm.graph.nodes if n.target is torch.nn.functional.linear and f".layers.{layer}." in
            str(list(n.meta.get("nn_module_stack", {None: ("",)}).values())[-1][0])][-1]


def assert_same_outputs(whole: torch.fx.GraphModule, pieces: torch.fx.GraphModule, example: list) -> None:
    """Both, fed the same random tokens at random positions into the same empty cache, agree."""
    gen = torch.Generator().manual_seed(1)
    for n in (7, 3):
        ids = torch.randint(0, pass_testing.VOCAB, (n,), generator=gen)
        positions = torch.randint(0, 60, (n,), generator=gen)
        outs = []
        for gm in (whole, pieces):
            with torch.no_grad(), forward_context(pass_testing.fresh_cache_metadata([n], num_layers=LAYERS)):
                outs.append(gm(*graph_inputs(gm, example, ids, positions)))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def split(gm: torch.fx.GraphModule, example: list, compile_piece: object) -> tuple | None:
    """compile_by_layer on real example inputs: its trial run of the pieces needs a step context."""
    with torch.no_grad(), forward_context(pass_testing.fresh_cache_metadata([5], num_layers=LAYERS)):
        return compile_by_layer(gm, example, compile_piece)


def counting(calls: list) -> object:
    """A piece compiler that runs the piece as is and counts its calls."""
    def compile_piece(piece: torch.fx.GraphModule, example: list) -> object:
        calls.append(piece)
        return piece

    return compile_piece


def test_partitions_run_pre_layers_post_in_graph_order():
    gm, _ = rewritten()
    part = layer_partitions(gm)
    assert part is not None
    assert sorted(set(part.values()))[:LAYERS + 1] == list(range(LAYERS + 1))
    for node, p in part.items():
        assert all(part.get(a, 0) <= p for a in node.all_input_nodes), node  # nothing flows backwards
    attention = [p for n, p in part.items() if "paged_attention" in str(n.target)]
    assert attention == list(range(1, LAYERS + 1))  # one attention per layer piece
    embedding = [p for n, p in part.items() if n.target is torch.nn.functional.embedding]
    assert embedding == [0]


def test_identical_layers_compile_once_and_the_pieces_compute_the_whole_graph():
    gm, example = rewritten()
    calls: list = []
    pieces, stats = split(copy.deepcopy(gm), example, counting(calls))
    assert stats["layers"] == LAYERS and stats["pieces"] in (LAYERS + 1, LAYERS + 2)
    # pre, layer 0 (its input norm adds no residual), one for layers 1-4, layer 5 (it returns no
    # residual) (+ post, if any)
    assert stats["compiled"] == len(calls) == stats["pieces"] - LAYERS + 3
    assert_same_outputs(gm, pieces, example)


def test_a_layer_that_differs_gets_its_own_compile():
    gm, example = rewritten()
    odd = _layer_node(gm, 2)
    with gm.graph.inserting_after(odd):
        scaled = gm.graph.call_function(torch.mul, (odd, 0.5))
    scaled.meta = dict(odd.meta)
    odd.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    gm.recompile()
    calls: list = []
    pieces, stats = split(copy.deepcopy(gm), example, counting(calls))
    assert stats["compiled"] == stats["pieces"] - LAYERS + 4  # ... and layer 2 on its own
    assert_same_outputs(gm, pieces, example)


def test_layers_that_share_little_compile_whole():
    gm, example = rewritten()
    for layer in range(LAYERS):  # a different constant in every layer, like a quantized model's weights
        node = _layer_node(gm, layer)
        with gm.graph.inserting_after(node):
            scaled = gm.graph.call_function(torch.mul, (node, 1.0 + layer))
        scaled.meta = dict(node.meta)
        node.replace_all_uses_with(scaled, delete_user_cb=lambda user, s=scaled: user is not s)
    gm.recompile()
    calls: list = []
    assert split(gm, example, counting(calls)) is None
    assert calls == []


def test_a_node_flowing_back_to_an_earlier_layer_keeps_the_graph_whole():
    gm, _ = rewritten()
    late = _layer_node(gm, 3)
    late.meta["nn_module_stack"] = dict(_layer_node(gm, 0).meta["nn_module_stack"])  # claims layer 0
    assert layer_partitions(gm) is None


def test_a_graph_without_layers_is_not_split():
    class NoLayers(torch.nn.Module):
        def forward(self, input_ids, positions):
            return input_ids.float() * 2 + positions

    gm = torch.fx.symbolic_trace(NoLayers())
    assert layer_partitions(gm) is None


@pytest.mark.heavy
@pytest.mark.parametrize("regional", ["1", "0", "whole_graph_compile"])
def test_inductor_pieces_agree_with_transformers(regional, monkeypatch):
    """The real thing: Inductor compiles the pieces (or the whole graph: regional compiling off, or
    inside `whole_graph_compile()`, as an AOT compile for a build is); the step's hidden states match
    transformers' on the same weights."""
    monkeypatch.setenv("COMPILED_SERVE_REGIONAL_COMPILE", "1" if regional == "whole_graph_compile" else regional)
    torch._dynamo.reset()
    hf = tiny_hf_model("llama", num_hidden_layers=LAYERS)
    ours = ours_from_hf(hf).eval()
    step, report = compile_model(ours, mode="inductor")
    ids = torch.randint(0, pass_testing.VOCAB, (9,), generator=torch.Generator().manual_seed(3))
    context = whole_graph_compile() if regional == "whole_graph_compile" else contextlib.nullcontext()
    with torch.no_grad(), forward_context(pass_testing.fresh_cache_metadata([9], num_layers=LAYERS)), context:
        got = step(ids, torch.arange(9))  # compiling is lazy: the first call compiles
    with torch.no_grad():
        want = hf.model(ids[None]).last_hidden_state[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    regions = report.graphs[0].get("regions")
    if regional == "1":
        assert regions is not None and regions["layers"] == LAYERS
        assert regions["compiled"] == regions["pieces"] - LAYERS + 3
    else:
        assert regions is None


def test_only_cuda_graphs_are_split_unless_the_setting_forces_it(monkeypatch) -> None:
    """On the CPU each piece is a Python call per layer (a slower step): the split is CUDA's by default."""
    from compiled_serve.passes.layer_regions import regional_compile_enabled

    cpu_inputs = [torch.zeros(2), 3]
    for setting, want in (("auto", False), ("", False), ("1", True), ("0", False)):
        monkeypatch.setenv("COMPILED_SERVE_REGIONAL_COMPILE", setting)
        assert regional_compile_enabled(cpu_inputs) is want, setting
    monkeypatch.delenv("COMPILED_SERVE_REGIONAL_COMPILE")
    assert regional_compile_enabled(cpu_inputs) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_graphs_are_split_by_default(monkeypatch) -> None:
    from compiled_serve.passes.layer_regions import regional_compile_enabled

    monkeypatch.delenv("COMPILED_SERVE_REGIONAL_COMPILE", raising=False)
    assert regional_compile_enabled([torch.zeros(2, device="cuda")]) is True
