"""Weight-only quantized linears on the CPU: kernels against each other, then the engine end to end.

    python bench/cpu_quantized.py kernels   # every linear of the embedded model, each layout, M = 1, 2, 16
    python bench/cpu_quantized.py engine    # LLM() single stream per layout (one subprocess each: RSS)
    python bench/cpu_quantized.py quality   # logit error vs fp32 dequantized, perplexity, per layout
    python bench/cpu_quantized.py all

Workload as bench/cpu_throughput.py: the embedded SmolLM2-135M Q4_1 GGUF, a 19-token prompt,
128 greedy tokens, 2 threads. The reference is transformers fp32 `generate` on the same
dequantized weights (its greedy tokens and, per step, the gap between its top two logits: a
divergence where that gap is small is a near-tie, not an error). Layouts: models/quantized.py.
The engine runs fp32, int8 and int4 through `LLM(quantization=...)` (int4 on this file is what
`--quantization gguf` serves), and bf16 / q8b, which are layouts but not options, through
`load_gguf_quantized` with QuantizedLinearPass as an extra pass. Writes
bench/results/cpu_quantized.json (merging with the sections already there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

PROMPT = "Write a short story about a robot who learns to paint. The robot lived in a"
NEW_TOKENS = 128
LAYOUTS = ("fp32", "bf16", "int8", "q8b", "int4")
OUT = Path(__file__).parent / "results" / "cpu_quantized.json"
PASS_SPEC = "compiled_serve.passes.quantized_linear:QuantizedLinearPass"


def _best_ms(fn, reps: int = 5) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), sorted(times)[len(times) // 2]


def bench_kernels() -> list[dict]:
    """All 120 linears of the model once per call (the weights stream from memory: > L3)."""
    from compiled_serve.models.default_model import default_model_path
    from compiled_serve.models.loaders.gguf_quantized import load_gguf_quantized
    from compiled_serve.passes.quantized_linear import _OPS

    rows = []
    for layout in LAYOUTS:
        loaded = load_gguf_quantized(default_model_path(), "bf16" if layout == "fp32" else layout)
        weights = [p.quantized_weight for p in loaded.module.parameters() if hasattr(p, "quantized_weight")]
        if layout == "fp32":
            calls = [(torch.nn.functional.linear, (qw.dequantize(),)) for qw in weights]
        else:
            fn, names = _OPS[layout]
            extra = (weights[0].group_size,) if layout == "int4" else ()
            calls = [(fn, (*(qw.tensors[n] for n in names), *extra)) for qw in weights]
        nbytes = sum(a[0].numel() * 4 for _, a in calls) if layout == "fp32" else sum(qw.nbytes() for qw in weights)
        for m in (1, 2, 16):
            xs = {qw.shape[1]: torch.randn(m, qw.shape[1]) for qw in weights}

            best, median = _best_ms(lambda calls=calls, xs=xs, packed=layout == "int4": [
                fn(xs[args[0].shape[1] * (2 if packed else 1)], *args) for fn, args in calls])
            rows.append({"layout": layout, "tokens": m, "weight_mb": round(nbytes / 1e6, 1),
                         "ms_best": round(best, 2), "ms_median": round(median, 2),
                         "gb_s_best": round(nbytes / best / 1e6, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def reference_tokens() -> dict:
    """transformers fp32 greedy tokens and each step's top-2 logit gap."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compiled_serve.models.default_model import default_model_path

    path = Path(default_model_path())
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok([PROMPT], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.eos_token_id, output_scores=True, return_dict_in_generate=True)
    top2 = [torch.topk(s[0].float(), 2).values for s in out.scores]
    return {"tokens": out.sequences[0, ids.input_ids.shape[1]:].tolist(),
            "gaps": [round(float(t[0] - t[1]), 4) for t in top2]}


def engine_child(layout: str, reps: int) -> dict:
    """One layout's engine in this process: tok/s per repeat, greedy tokens, peak RSS."""
    from compiled_serve import LLM, SamplingParams
    from compiled_serve.engine import llm_engine
    from compiled_serve.models.default_model import default_model_path
    from compiled_serve.models.loaders.gguf_quantized import load_gguf_quantized

    torch.set_num_threads(2)
    extra: tuple[str, ...] = ()
    option = {"fp32": "none", "int8": "int8", "int4": "int4"}.get(layout, "none")
    if layout in ("bf16", "q8b"):
        original = llm_engine.load_model_cached

        def load_quantized(config, *args, **kwargs):
            if config.model is None:
                return load_gguf_quantized(default_model_path(), layout)
            return original(config, *args, **kwargs)

        llm_engine.load_model_cached = load_quantized
        extra = (PASS_SPEC,)
    start = time.perf_counter()
    llm = LLM(max_num_seqs=64, extra_passes=extra, quantization=option)
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm.generate([PROMPT], params, use_progress=False)
    rates, tokens = [], []
    for _ in range(reps):
        start = time.perf_counter()
        outs = llm.generate([PROMPT], params, use_progress=False)
        tokens = list(outs[0].outputs[0].token_ids)
        rates.append(round(len(tokens) / (time.perf_counter() - start), 2))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"layout": layout, "tok_s": rates, "startup_s": round(startup, 1), "peak_rss_mb": round(rss_mb),
            "tokens": tokens, "load_avg": Path("/proc/loadavg").read_text().split()[0]}


def compare(tokens: list[int], ref: dict) -> dict:
    """First divergence from the reference and the reference's top-2 gap there."""
    first = next((i for i, (a, b) in enumerate(zip(tokens, ref["tokens"])) if a != b), None)
    return {"same_tokens": first is None, "first_divergence": first,
            "ref_top2_gap_there": None if first is None else ref["gaps"][first]}


def bench_engine(reps: int, layouts: list[str]) -> list[dict]:
    ref = reference_tokens()
    rows = []
    for layout in layouts:
        proc = subprocess.run([sys.executable, __file__, "child", layout, str(reps)], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            rows.append({"layout": layout, "error": proc.stderr[-2000:]})
            continue
        row = json.loads(lines[-1])
        row.update(compare(row.pop("tokens"), ref))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# A fixed text for perplexity (public-domain style prose, ~150 tokens with SmolLM2's tokenizer).
QUALITY_TEXT = (
    "The river ran quietly past the old mill, where the miller's daughter kept the accounts and "
    "fed the geese every morning before school. In the spring the water rose high enough to turn "
    "the great wheel twice as fast, and the village brought its grain from miles around. She "
    "wrote each sack in a ledger with a steel pen, the weight, the name of the farmer and the "
    "price, and at the end of the month she added the columns by candlelight. Her father said "
    "that numbers never lie, but people sometimes do, and so the ledger was kept in a locked "
    "drawer beneath the window that looked out over the weir."
)
QUALITY_LAYOUTS = ("bf16", "q8b", "int8", "int4", "fp8")  # fp8: the CUDA op's math, through its CPU reference


def _quantized_forward(module: torch.nn.Module) -> Callable:
    """The model's forward with QuantizedLinearPass applied, run as the rewritten graph."""
    from compiled_serve.passes.quantized_linear import QuantizedLinearPass

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        QuantizedLinearPass()(gm)
        return gm.forward

    return torch.compile(module.forward, backend=backend, dynamic=True, fullgraph=True)


def bench_quality() -> list[dict]:
    """Per layout, on QUALITY_TEXT (teacher-forced, one prefill): final hidden-state and logit error
    against the fp32 model on the file's dequantized weights, top-1 agreement, and perplexity."""
    from compiled_serve.models.default_model import default_model_path
    from compiled_serve.models.loader import load_model
    from compiled_serve.models.loaders.gguf_quantized import load_gguf_quantized

    path = default_model_path()
    ref_model = load_model(path, dtype=torch.float32, device="cpu")
    ids = torch.tensor(ref_model.tokenizer(QUALITY_TEXT).input_ids)
    pos = torch.arange(len(ids))

    def measure(hidden: torch.Tensor, logits: torch.Tensor) -> dict:
        nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
        return {"hidden": hidden, "logits": logits, "ppl": float(torch.exp(nll))}

    with torch.inference_mode():
        h = ref_model.module(ids, pos)
        ref = measure(h, ref_model.module.compute_logits(h))
    del ref_model
    top2 = ref["logits"].topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    rows = [{"layout": "fp32", "tokens": len(ids), "perplexity": round(ref["ppl"], 3)}]
    print(json.dumps(rows[-1]), flush=True)
    for layout in QUALITY_LAYOUTS:
        loaded = load_gguf_quantized(path, layout)  # bf16 scales: the fast kernels, as served
        forward = _quantized_forward(loaded.module)
        with torch.inference_mode():
            h = forward(ids, pos)
            got = measure(h, loaded.module.compute_logits(h))
        dl = (got["logits"] - ref["logits"]).abs()
        dh = (got["hidden"] - ref["hidden"]).norm(dim=-1) / ref["hidden"].norm(dim=-1)
        agree = got["logits"].argmax(-1) == ref["logits"].argmax(-1)
        clear = gaps > 2 * float(dl.max())
        rows.append({"layout": layout, "tokens": len(ids), "perplexity": round(got["ppl"], 3),
                     "logit_max_abs_err": round(float(dl.max()), 4), "logit_mean_abs_err": round(float(dl.mean()), 4),
                     "logit_scale": round(float(ref["logits"].abs().max()), 2),
                     "hidden_rel_err_max": round(float(dh.max()), 4), "hidden_rel_err_mean": round(float(dh.mean()), 4),
                     "top1_agreement": round(float(agree.float().mean()), 4),
                     "top1_agreement_where_gap_exceeds_2x_max_err": bool(agree[clear].all()),
                     "clear_positions": int(clear.sum())})
        print(json.dumps(rows[-1]), flush=True)
    rows.append({"layout": "fp8", "note": "CUDA only (torch._scaled_mm); not measured on this machine"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["kernels", "engine", "quality", "all", "child"])
    ap.add_argument("layout", nargs="?")
    ap.add_argument("reps", nargs="?", type=int, default=3)
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="engine runs, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.what == "child":
        print(json.dumps(engine_child(args.layout, args.reps)))
        return
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    result.update({"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                   "hardware": f"{platform.processor() or platform.machine()}, 2-core shared VM, 2 threads"})
    if args.what in ("kernels", "all"):
        result["kernels"] = bench_kernels()
    if args.what in ("engine", "all"):
        result["engine"] = bench_engine(args.reps, args.layouts.split(","))
    if args.what in ("quality", "all"):
        result["quality"] = bench_quality()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
