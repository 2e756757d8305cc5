"""Where a workload's step time goes: host launch time, time the host waits for the device, step
intervals by kind (decode / mixed), and a kernel breakdown of a window of decode steps.

    python3 bench/step_profile.py --workload W1 [--scheduling async] [--out DIR]

Writes step_profile-<workload>-<scheduling>.json (and a kernel table .txt) under --out.
A speed claim comes from `compiled-serve bench`; this script explains one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from compiled_serve.bench.defaults import ENGINE_DEFAULTS
from compiled_serve.bench.offline import sampling_params, start_llm
from compiled_serve.bench.workloads import WORKLOADS, draw_requests
from compiled_serve.engine import step_runner


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="W1")
    ap.add_argument("--scheduling", default="async")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--quantization", default=None, help="e.g. fp8 (the file names carry it)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    wl = WORKLOADS[args.workload]
    settings = dict(ENGINE_DEFAULTS)
    settings["scheduling"] = args.scheduling
    if args.quantization:
        settings["quantization"] = args.quantization
    compiles: list[tuple[str, str]] = []  # (phase, kernel key) of every Triton compile
    phase = {"now": "startup"}
    try:
        import triton

        def on_compile(*a, **k):
            fn = k.get("fn")
            compiles.append((phase["now"], f"{getattr(fn, 'name', fn)}: {str(k.get('key', ''))[:1500]}"))

        triton.knobs.runtime.jit_post_compile_hook = on_compile
    except Exception as err:  # noqa: BLE001
        compiles.append(("none", f"(no triton hook: {err})"))
    llm, ready_s = start_llm(wl.model, settings)
    phase["now"] = "after-ready"
    engine = llm.llm_engine
    requests = draw_requests(wl, engine.model_config.vocab_size)
    prompts, outs = requests.prompts, requests.output_lens
    if args.num_requests:
        prompts, outs = prompts[: args.num_requests], outs[: args.num_requests]

    launches: list[tuple[str, int, int, float]] = []  # (kind, tokens, seqs, host ms)
    waits: list[float] = []
    step_ends: list[float] = []
    original_launch = engine._launch
    prof_state = {"prof": None, "left": 0, "started": False}

    def timed_launch(sched, *rest):
        t0 = time.perf_counter()
        result = original_launch(sched, *rest)
        ms = (time.perf_counter() - t0) * 1e3
        n_tok = sched.num_tokens
        kind = "decode" if n_tok == len(sched.scheduled) else "mixed"
        launches.append((kind, n_tok, len(sched.scheduled), ms))
        step_ends.append(time.perf_counter())
        # Profile a window of decode steps at the full batch, once the batch has filled.
        if (kind == "decode" and not prof_state["started"] and len(sched.scheduled) >= min(len(prompts), 128)
                and args.profile_steps and torch.cuda.is_available()):
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
            prof_state.update(prof=prof, left=args.profile_steps, started=True)
        elif prof_state["prof"] is not None:
            prof_state["left"] -= 1
            if prof_state["left"] <= 0:
                torch.cuda.synchronize()
                prof_state["prof"].__exit__(None, None, None)
                prof_state["done"] = prof_state["prof"]
                prof_state["prof"] = None
        return result

    original_wait = step_runner.InFlightStep.wait

    def timed_wait(self):
        t0 = time.perf_counter()
        original_wait(self)
        waits.append((time.perf_counter() - t0) * 1e3)

    # What compiles after ready (there should be nothing): Triton kernels and dynamo frames.
    from torch._dynamo.utils import counters

    frames_before = dict(counters["frames"])
    mixed_prof: dict = {"left": 3 if torch.cuda.is_available() else 0, "prof": None}
    original_timed = timed_launch

    def launch_with_mixed_profile(sched, *rest):
        is_mixed = sched.num_tokens != len(sched.scheduled)
        if is_mixed and mixed_prof["left"] > 0 and len(launches) > 5 and prof_state["prof"] is None:
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                result = original_timed(sched, *rest)
                torch.cuda.synchronize()
            mixed_prof["left"] -= 1
            mixed_prof["prof"] = prof
            return result
        return original_timed(sched, *rest)

    engine._launch = launch_with_mixed_profile
    step_runner.InFlightStep.wait = timed_wait
    params = sampling_params(outs)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_progress=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    intervals = [(b - a) * 1e3 for a, b in zip(step_ends, step_ends[1:])]
    kinds = [k for k, *_ in launches[1:]]
    by_kind = {}
    for kind in ("decode", "mixed"):
        iv = [i for i, k in zip(intervals, kinds) if k == kind]
        lm = [ms for k, _, _, ms in launches if k == kind]
        by_kind[kind] = {"steps": len(lm), "interval_ms_p50": _pct(iv, 0.5), "interval_ms_p90": _pct(iv, 0.9),
                         "launch_host_ms_p50": _pct(lm, 0.5), "launch_host_ms_p90": _pct(lm, 0.9)}
    frames_after = dict(counters["frames"])
    compiled_after_ready = [key for ph, key in compiles if ph == "after-ready"]
    startup_attention = [key for ph, key in compiles if ph == "startup" and "paged_attention" in key]
    record = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d"), "workload": wl.id, "scheduling": args.scheduling,
        "ready_s": ready_s, "elapsed_s": elapsed, "output_tokens": produced, "out_tok_s": produced / elapsed,
        "steps": len(launches), "wait_ms_p50": _pct(waits, 0.5), "wait_ms_total": sum(waits),
        "launch_ms_total": sum(ms for *_, ms in launches), "by_kind": by_kind,
        "compile_seconds": engine.compile_seconds, "startup": engine.startup_report(),
        "compiled_after_ready": compiled_after_ready, "startup_attention_compiles": startup_attention,
        "dynamo_frames_after_ready": {k: frames_after.get(k, 0) - frames_before.get(k, 0) for k in frames_after},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"step_profile-{wl.id}-{args.scheduling}" + (f"-{args.quantization}" if args.quantization else "")
    (out / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))
    prof = prof_state.get("done")
    if prof is not None:
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        (out / f"{name}-kernels.txt").write_text(table)
        print(table[:6000])
    if mixed_prof["prof"] is not None:
        table = mixed_prof["prof"].key_averages().table(sort_by="cpu_time_total", row_limit=30)
        (out / f"{name}-mixed-cpu.txt").write_text(table)
        print(table[:5000])
    print("compiled after ready:", compiled_after_ready[:20], record["dynamo_frames_after_ready"])
    print(json.dumps({k: record[k] for k in ("workload", "scheduling", "ready_s", "out_tok_s", "steps",
                                             "wait_ms_p50", "wait_ms_total", "launch_ms_total")}))
    print(json.dumps(by_kind))



if __name__ == "__main__":
    main()
