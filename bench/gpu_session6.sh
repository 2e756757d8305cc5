#!/usr/bin/env bash
# Session 6's device calls. PART=a: bench/gpu_session5.sh (GPU tests with regional compilation on,
# W4 through the server, the structured-output overheads). PART=b: the 8B cold compile and warm
# starts with regional compilation (bench/gpu_start.sh), then the cold compile with it off, for the
# same-day comparison (issue 9: cold compile < 27.9 s). PART=c: W2 and W3 with it on (throughput
# must not move). PART=d: every GPU test, the batch mask fill A/B (issue 10), W3 with FP8 weights (issue 13:
# >= 1.6x our bf16 W3). PART=e: W4, then W2 with FP8 weights (>= 1.3x our bf16 W2). Carry: .whl .gputok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
case "${PART:-a}" in
a) bash bench/gpu_session5.sh ;;
b) source bench/device_setup.sh >/dev/null 2>&1
   export PYTHONUNBUFFERED=1
   COMPILED_SERVE_REGIONAL_COMPILE=1 timeout 300 bash bench/gpu_start.sh
   mkdir -p "$OUT/whole"
   COMPILED_SERVE_REGIONAL_COMPILE=0 OUT=$OUT/whole timeout 200 bash -c '
     export COMPILED_SERVE_CACHE_ROOT=/tmp/cs-cache-whole; rm -rf /tmp/b8w $COMPILED_SERVE_CACHE_ROOT
     t0=$(date +%s.%N)
     python3 -c "import sys; from compiled_serve.cli import main; sys.exit(main(sys.argv[1:]))" compile llama-3.1-8b \
       --load-format dummy --device cuda --max-num-seqs 256 --max-num-batched-tokens 8192 --no-progress \
       --build-dir /tmp/b8w > $OUT/start_compile.log 2>&1
     echo "whole-graph cold compile (process start to exit): $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
     grep -E "compiled graph|warm-up done|load .*compile .*total" $OUT/start_compile.log | cut -c1-220 | tail -4'
   ;;
c) source bench/device_setup.sh >/dev/null 2>&1
   export PYTHONUNBUFFERED=1
   CLI="python3 -c 'import sys; from compiled_serve.cli import main; sys.exit(main(sys.argv[1:]))'"
   eval "timeout 300 $CLI bench throughput --workload W2 --results-dir $OUT" 2>&1 | grep -v "^DEBUG" | tail -12
   eval "timeout 240 $CLI bench latency --results-dir $OUT" 2>&1 | grep -v "^DEBUG" | tail -12 ;;
d) source bench/device_setup.sh >/dev/null 2>&1
   export PYTHONUNBUFFERED=1 COMPILED_SERVE_TEST_SMOLLM2_TOKENIZER=$PWD/.gputok
   CLI="python3 -c 'import sys; from compiled_serve.cli import main; sys.exit(main(sys.argv[1:]))'"
   timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu -rfEs --timeout=120 --continue-on-collection-errors tests 2>&1 \
     | tee "$OUT/gpu_tests.log" | tail -8
   # The mask-fill A/B ran here with --serial-fill (removed with the thread-pool fill it compared).
   timeout 90 python3 bench/structured_bench.py --device cuda --dummy-weights .gputok --backends llguidance \
     --no-tail --out "$OUT" 2>&1 | grep -A8 '"step"' | tr -d '\n '; echo
   eval "timeout 200 $CLI bench latency --quantization fp8 --results-dir $OUT/fp8" 2>&1 | grep -v "^DEBUG" | tail -12 ;;
e) source bench/device_setup.sh >/dev/null 2>&1
   export PYTHONUNBUFFERED=1
   CLI="python3 -c 'import sys; from compiled_serve.cli import main; sys.exit(main(sys.argv[1:]))'"
   eval "timeout 200 $CLI bench serve --results-dir $OUT" 2>&1 | grep -v -E "^DEBUG|httpx" | tail -12
   eval "timeout 300 $CLI bench throughput --workload W2 --quantization fp8 --results-dir $OUT/fp8" 2>&1 \
     | grep -v "^DEBUG" | tail -12 ;;
esac
