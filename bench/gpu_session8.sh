#!/usr/bin/env bash
# Session 8's device calls (issue 13, FP8 weights: the one-row quantize's amax in chunks,
# kernels/quantized_linear.py row_amax). PART=a: the quantize micro-benchmark (one-program against
# chunked amax, Inductor, CUDA-graph replays), the fp8 tests, then W3 and W2 with FP8 weights
# against FP8's own floor. PART=c: every GPU test. Carry: .whl .gputok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source bench/device_setup.sh >/dev/null 2>&1
export PYTHONUNBUFFERED=1 COMPILED_SERVE_TEST_SMOLLM2_TOKENIZER=$PWD/.gputok
CLI="python3 -c 'import sys; from compiled_serve.cli import main; sys.exit(main(sys.argv[1:]))'"
case "${PART:-a}" in
a) timeout 150 python3 bench/fp8_quantize_bench.py 2>&1 | grep -v -E "^DEBUG|INFO" | tail -6
   cp bench/results/fp8/fp8_quantize_bench-*.json "$OUT/" 2>/dev/null
   timeout 120 python3 -m pytest -q -p no:cacheprovider -rfEs --timeout=100 tests/kernels/test_quantized_fp8.py 2>&1 | tail -3
   eval "timeout 150 $CLI bench latency --quantization fp8 --results-dir $OUT/fp8" 2>&1 | grep -v -E "^DEBUG|INFO" | tail -9
   eval "timeout 200 $CLI bench throughput --workload W2 --quantization fp8 --results-dir $OUT/fp8" 2>&1 \
     | grep -v -E "^DEBUG|INFO" | tail -9 ;;
c) timeout 400 python3 -m pytest -q -p no:cacheprovider -m gpu -rfEs --timeout=150 --continue-on-collection-errors tests 2>&1 \
     | tee "$OUT/gpu_tests.log" | tail -8 ;;
esac
