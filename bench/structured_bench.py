"""Structured-output costs on this machine: grammar compile times, mask fill per row, the masked
tail against the unmasked one, and engine decode steps with and without a schema.

1. compile: llguidance's tokenizer build (once per tokenizer), then each spec of
   tests/structured_cases.py compiled without our cache: the first time, and the median of
   REPEATS more (each a full compile: grammar text, matcher, first mask);
2. mask: one bitmask row filled by a matcher mid-way through a JSON object, median us;
3. tail: the compiled logits tail (one fused_sample) at batch 1 and 64 at the model's vocabulary,
   with and without a bitmask (CUDA: torch.cuda.Event timing; CPU: perf_counter), median us;
4. step: LLMEngine decode-step time at batch 1 and 64, unconstrained vs every row under the
   "nested_object" schema (the constrained rows take the host-built tail and wait for the step in
   flight, so this includes the lost overlap), mean ms over the decode steps.

    python bench/structured_bench.py [--device cpu|cuda] [--steps 24] [--out DIR]

Writes DIR/structured_bench[_DEVICE].json (DIR: --out, else $OUT, else bench/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
REPEATS = 5


def median_ms(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compile_times(tokenizer, vocab: int) -> dict:
    from structured_cases import CHOICES, LARK, REGEX, SCHEMAS

    from compiled_serve.structured import StructuredOutputsParams as Spec
    from compiled_serve.structured.llguidance_backend import LLGuidanceBackend

    t0 = time.perf_counter()
    backend = LLGuidanceBackend(tokenizer, vocab)
    out = {"tokenizer_build_ms": (time.perf_counter() - t0) * 1e3}
    specs = {f"json:{name}": Spec(json=schema) for name, schema in SCHEMAS.items()}
    specs |= {"regex": Spec(regex=REGEX), "choice": Spec(choice=CHOICES), "lark": Spec(grammar=LARK),
              "json_object": Spec(json_object=True)}
    # The first compile of each spec (llguidance keeps no cache between matchers, but the
    # process's allocator and the tokenizer's tables are warm after the first), then the median.
    out["first_compile_ms"] = {name: round(median_ms(lambda s=spec: backend.compile(s), repeats=1), 3)
                               for name, spec in specs.items()}
    out["compile_ms"] = {name: round(median_ms(lambda s=spec: backend.compile(s)), 3) for name, spec in specs.items()}
    grammar = backend.compile(specs["json:nested_object"])
    matcher = grammar.matcher()
    for token in tokenizer.encode('{"name":"Ann","address":{"city":"', add_special_tokens=False):
        assert matcher.accept_token(token)
    row = np.empty(-(-vocab // 32), dtype=np.int32)
    out["mask_fill_us"] = round(median_ms(lambda: matcher.fill_bitmask(row), repeats=50) * 1e3, 1)
    return out


def tail_times(vocab: int, device: torch.device) -> dict:
    from compiled_serve.passes.logits_tail_pipeline import compile_logits_tail

    tail, _ = compile_logits_tail("graph")
    out = {}
    for batch in (1, 64):
        logits = torch.randn(batch, vocab, device=device)
        args = (torch.ones(batch, device=device), torch.zeros(batch, dtype=torch.int32, device=device),
                torch.ones(batch, device=device), torch.zeros(batch, device=device),
                torch.arange(batch, device=device), torch.zeros(batch, dtype=torch.int64, device=device),
                torch.zeros(batch, dtype=torch.bool, device=device))
        mask = torch.randint(-(2**31), 2**31 - 1, (batch, -(-vocab // 32)), dtype=torch.int32, device=device)
        for name, extra in (("plain", (None,) * 6), ("bitmask", (None,) * 5 + (mask,))):
            def run(extra=extra, logits=logits, args=args):
                tail(logits, *args, *extra)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            for _ in range(3):
                run()
            out[f"batch{batch}_{name}_us"] = round(median_ms(run, repeats=20) * 1e3, 1)
    return out


def step_times(device: str, steps: int) -> dict:
    from structured_cases import SCHEMAS

    from compiled_serve.config import EngineConfig
    from compiled_serve.engine.llm_engine import LLMEngine
    from compiled_serve.sampling_params import SamplingParams
    from compiled_serve.structured import StructuredOutputsParams

    engine = LLMEngine(EngineConfig(compile_mode="graph", device=device, max_num_seqs=64))
    out = {}
    for batch in (1, 64):
        for name, spec in (("plain", None), ("schema", StructuredOutputsParams(json=SCHEMAS["nested_object"]))):
            params = SamplingParams(temperature=1.0, max_tokens=steps, ignore_eos=spec is None, structured_outputs=spec)
            for i in range(batch):
                engine.add_request(f"{name}-{batch}-{i}", "Answer with the requested data.\n", params)
            engine.step()  # prefill
            times = []
            while engine.has_unfinished_requests():
                t0 = time.perf_counter()
                engine.step()
                times.append((time.perf_counter() - t0) * 1e3)
            engine._finish_inflight()
            decode = times[1:-1] or times
            out[f"batch{batch}_{name}_step_ms"] = round(statistics.mean(decode), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from compiled_serve.llm import LLM  # noqa: F401  (the package, as the engine imports it)
    from compiled_serve.models.default_model import default_model_path
    from compiled_serve.models.loaders.gguf_file import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(default_model_path(), None)
    vocab = 49152
    result = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"), "device": args.device,
        "machine": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        **compile_times(tokenizer, vocab),
        "tail": tail_times(vocab, torch.device(args.device)),
        "step": step_times(args.device, args.steps),
    }
    out_dir = Path(args.out or os.environ.get("OUT") or REPO / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"structured_bench_{args.device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
