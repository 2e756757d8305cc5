#!/usr/bin/env bash
# Cold compile and warm start of the 8B shape on the GPU (PERF.md: cold compile < 27.9 s; warm
# start from a build <= 1 s compiling and <= 10 s from process start to ready). Run after
# device_setup.sh; logs under $OUT. Usage: bash bench/gpu_start.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CLI="python3 -c 'import sys; from compiled_serve.cli import main; sys.exit(main(sys.argv[1:]))'"
ARGS="llama-3.1-8b --load-format dummy --device cuda --max-num-seqs 256 --max-num-batched-tokens 8192 --no-progress"
export COMPILED_SERVE_CACHE_ROOT=/tmp/cs-cache-start
rm -rf /tmp/b8 "$COMPILED_SERVE_CACHE_ROOT"
t0=$(date +%s.%N)
eval "timeout ${COMPILE_TIMEOUT:-240} $CLI compile $ARGS --build-dir /tmp/b8" > "$OUT/start_compile.log" 2>&1
echo "cold compile (process start to exit): $(echo "$(date +%s.%N) - $t0" | bc) s rc=$?"
grep -E "ready|compile|phase|warm" "$OUT/start_compile.log" | grep -v DEBUG | tail -12
for run in 1 2; do
  t0=$(date +%s.%N)
  python3 - "$run" > "$OUT/start_warm$run.log" 2>&1 <<'PY'
import sys, time
t0 = time.perf_counter()
from compiled_serve import LLM
llm = LLM("llama-3.1-8b", load_format="dummy", device="cuda", max_num_seqs=256, max_num_batched_tokens=8192,
          build_dir="/tmp/b8")
print(f"warm start {sys.argv[1]}: LLM() ready in {time.perf_counter() - t0:.1f} s "
      f"(load {llm.llm_engine.load_seconds:.1f} s, compile and warm-up {llm.llm_engine.compile_seconds:.1f} s)")
PY
  echo "warm start $run (process start to ready, interpreter included): $(echo "$(date +%s.%N) - $t0" | bc) s"
  grep -E "warm start|ready|Error|error" "$OUT/start_warm$run.log" | tail -6
done
