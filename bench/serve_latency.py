"""TTFT and inter-token latency of `compiled-serve serve` at several concurrency levels.

Starts the server as its own process on 127.0.0.1 (embedded SmolLM2 unless --model), then for
each concurrency level sends that many streaming completions at once (a ~256-token prompt,
128 output tokens, EOS ignored) and times every SSE chunk. Writes JSON to $OUT (if set) or
bench/results/serve_latency.json and prints a table.

    python bench/serve_latency.py [--device cuda] [--levels 1 4 16 64] [--compile-mode inductor]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPT = ("The history of the printing press begins in the fifteenth century, when " * 20).strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_stream(client: httpx.AsyncClient, max_tokens: int) -> tuple[float, list[float]]:
    body = {"model": "default", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
    ttft = stamps[0] - start
    return ttft, [b - a for a, b in zip(stamps, stamps[1:])]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_level(base: str, concurrency: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        models = (await client.get("/v1/models")).json()["data"]
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, max_tokens) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttfts = [r[0] for r in results]
    itls = [x for r in results for x in r[1]]
    return {"concurrency": concurrency, "model": models[0]["id"], "ttft_p50_ms": 1e3 * statistics.median(ttfts),
            "ttft_p99_ms": 1e3 * pct(ttfts, 0.99), "itl_p50_ms": 1e3 * statistics.median(itls),
            "itl_p99_ms": 1e3 * pct(itls, 0.99), "out_tok_s": concurrency * max_tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile-mode", default="inductor")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "compiled_serve.cli", "serve", "--port", str(port), "--device", args.device,
           "--compile-mode", args.compile_mode, "--served-model-name", "default"]
    if args.model:
        cmd += ["--model", args.model]
    server = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise SystemExit("server exited during start-up")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        startup = time.perf_counter() - t0
        asyncio.run(run_level(base, 2, 8))  # warm-up
        rows = [asyncio.run(run_level(base, c, args.max_tokens)) for c in args.levels]
    finally:
        server.terminate()
        server.wait(timeout=30)
    import torch

    hardware = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else platform.machine()
    result = {"date": datetime.date.today().isoformat(), "hardware": hardware, "torch": torch.__version__,
              "workload": f"~256-token prompt, {args.max_tokens} output tokens, EOS ignored, streaming",
              "compile_mode": args.compile_mode, "startup_to_ready_s": round(startup, 1), "rows": rows}
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'conc':>4} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'out tok/s':>9}  (ms)")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>9.1f} {r['itl_p50_ms']:>8.2f} "
              f"{r['itl_p99_ms']:>8.2f} {r['out_tok_s']:>9.0f}")
    print(f"{hardware}; torch {torch.__version__}; start-up to ready {startup:.1f}s; {result['date']}")


if __name__ == "__main__":
    main()
