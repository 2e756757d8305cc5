"""Where the tensor-parallel ranks' sockets bind (engine/tp_network.py): loopback by default, a
named interface only when `distributed_interface` names it, and an unknown interface or an
inherited GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME that disagrees refused before any worker starts.

Real engines (tiny dummy llama, gloo, 2 ranks); the sockets are read from /proc/net/tcp."""

from __future__ import annotations

import json
import os
import socket

import pytest
from tp_testing import listening_addresses

from compiled_serve.config import EngineConfig
from compiled_serve.engine.llm_engine import LLMEngine
from compiled_serve.engine.tp_network import ipv4_address
from compiled_serve.errors import InvalidParameterError
from compiled_serve.sampling_params import SamplingParams

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5}
LISTEN, ESTABLISHED = "0A", "01"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-net") / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return str(path)


@pytest.fixture(autouse=True)
def _no_inherited_socket_env(monkeypatch):
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(var, raising=False)


def _engine(model: str, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model, load_format="dummy", compile_mode="graph", num_kv_blocks=64,
                                  block_size=8, max_num_seqs=4, max_num_batched_tokens=64, tensor_parallel_size=2,
                                  **overrides))


def _greedy(engine: LLMEngine) -> list[int]:
    engine.add_request("r", [1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       output_kind="final")
    out: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = list(o.outputs[0].token_ids)
    return out


def _rank_sockets(engine: LLMEngine) -> tuple[list[str], list[str]]:
    """(listening, established) local addresses of the worker's TCP sockets: all of them gloo's."""
    pids = [p.pid for p in engine.tp.workers]
    return listening_addresses(pids, (LISTEN,)), listening_addresses(pids, (ESTABLISHED,))


def _hosts(addresses: list[str]) -> set[str]:
    return {a.rsplit(":", 1)[0] for a in addresses}


def _other_interface() -> tuple[str, str] | None:
    """A non-loopback interface of this machine with an IPv4 address, if there is one."""
    for _, name in socket.if_nameindex():
        address = ipv4_address(name)
        if name != "lo" and address is not None and not address.startswith("127."):
            return name, address
    return None


def test_default_ranks_bind_loopback_only(tiny):
    assert EngineConfig().distributed_interface == "lo"
    engine = _engine(tiny)
    try:
        tokens = _greedy(engine)
        listening, established = _rank_sockets(engine)
    finally:
        engine.shutdown()
    assert len(tokens) == 6
    assert established, "the worker holds no TCP connection: nothing was measured"
    assert _hosts(listening + established) == {"127.0.0.1"}, (listening, established)


def test_a_named_interface_is_where_the_ranks_bind(tiny, caplog):
    other = _other_interface()
    if other is None:
        pytest.skip("this machine has no non-loopback interface with an IPv4 address")
    name, address = other
    reference = _engine(tiny)
    try:
        expected = _greedy(reference)
    finally:
        reference.shutdown()
    with caplog.at_level("WARNING", logger="compiled_serve.engine"):
        engine = _engine(tiny, distributed_interface=name)
    try:
        tokens = _greedy(engine)
        listening, established = _rank_sockets(engine)
    finally:
        engine.shutdown()
    assert tokens == expected  # the collectives ran over it
    assert established and _hosts(listening + established) == {address}, (listening, established)
    assert f"bind to {name} ({address}), not loopback; this traffic is unauthenticated" in caplog.text


def _children() -> set[int]:
    me = str(os.getpid())
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == me:
                found.add(int(entry))
    return found


def test_an_unknown_interface_is_refused_before_any_worker_starts(tiny):
    before = _children()
    with pytest.raises(InvalidParameterError, match=r"distributed_interface.*no network interface 'nosuch0' "
                                                    r"\(it has: lo"):
        _engine(tiny, distributed_interface="nosuch0")
    assert _children() - before == set()


@pytest.mark.parametrize("var", ["GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"])
def test_an_inherited_socket_variable_does_not_move_the_traffic(tiny, monkeypatch, var):
    monkeypatch.setenv(var, "eth0")
    before = _children()
    with pytest.raises(InvalidParameterError, match=rf"{var}=eth0 in the environment .* pass "
                                                    r"--distributed-interface eth0 to use it"):
        _engine(tiny)
    assert _children() - before == set()


@pytest.mark.parametrize("bad", ["", " lo", "lo,eth0"])
def test_distributed_interface_must_name_one_interface(bad):
    with pytest.raises(InvalidParameterError, match="must name one network interface"):
        EngineConfig(distributed_interface=bad)


def test_serve_takes_distributed_interface():
    from compiled_serve.cli import _configs, build_parser

    args = build_parser().parse_args(["serve", "--distributed-interface", "eth0", "--tensor-parallel-size", "2"])
    engine_config, _ = _configs(args)
    assert engine_config.distributed_interface == "eth0"
    default, _ = _configs(build_parser().parse_args(["serve"]))
    assert default.distributed_interface == "lo"
