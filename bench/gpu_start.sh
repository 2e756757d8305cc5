#!/usr/bin/env bash
# Cold compile and warm start of the 8B shape on the GPU (PERF.md: cold compile < 27.9 s; warm
# start from a build <= 1 s compiling and <= 10 s from process start to ready). Run after
# device_setup.sh; logs under $OUT. Usage: bash bench/gpu_start.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export COMPILED_SERVE_CACHE_ROOT=/tmp/cs-cache-start
rm -rf /tmp/b8 "$COMPILED_SERVE_CACHE_ROOT"
now() { python3 -c 'import time; print(time.time())'; }
t0=$(now)
python3 - > "$OUT/start_compile.log" 2>&1 <<'PY'
import sys
from compiled_serve.cli import main
rc = main(["compile", "llama-3.1-8b", "--load-format", "dummy", "--device", "cuda", "--max-num-seqs", "256",
           "--max-num-batched-tokens", "8192", "--no-progress", "--build-dir", "/tmp/b8"])
import torch._dynamo.utils as u
print(u.compile_times(repr="str"))
sys.exit(rc)
PY
echo "cold compile (process start to exit): $(python3 -c "print(round($(now) - $t0, 1))") s"
grep -E "compiled graph|warm-up done|load .*compile .*total|artifacts" "$OUT/start_compile.log" | cut -c1-220 | tail -6
for run in 1 2; do
  t0=$(now)
  python3 - "$run" > "$OUT/start_warm$run.log" 2>&1 <<'PY'
import os, sys, time
t0 = time.perf_counter()
from compiled_serve import LLM
from compiled_serve.cache.triton_kernels import triton_cache_dir
llm = None
def kernel_dirs():
    d = triton_cache_dir()
    return set(os.listdir(d)) if d.is_dir() else set()
t_import = time.perf_counter() - t0
# The Triton cache this process uses is only known once the build set the Inductor dir: count
# what the warm start adds to it.
llm = LLM("llama-3.1-8b", load_format="dummy", device="cuda", max_num_seqs=256, max_num_batched_tokens=8192,
          build_dir="/tmp/b8")
e = llm.llm_engine
print(f"warm start {sys.argv[1]}: LLM() ready in {time.perf_counter() - t0:.1f} s (imports {t_import:.1f} s, "
      f"load {e.load_seconds:.1f} s, compile and warm-up {e.compile_seconds:.1f} s); "
      f"Triton cache {triton_cache_dir()}: {len(kernel_dirs())} kernel dirs; build: {e.build_status.message}; "
      f"installed kernels: {len((e.build_status.installed or {}).get('triton_kernels', []))}")
PY
  echo "warm start $run (process start to ready, interpreter included): $(python3 -c "print(round($(now) - $t0, 1))") s"
  grep -E "warm start|warm-up done|Error|error" "$OUT/start_warm$run.log" | cut -c1-400 | tail -4
done
