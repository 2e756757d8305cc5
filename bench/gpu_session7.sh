#!/usr/bin/env bash
# Session 7's device calls (issue 13, FP8 weights through cuBLASLt's tensorwise FP8 GEMM with the
# quantize of x and both scales as torch ops for Inductor to fuse). PART=a: the fp8 GPU tests, then
# W3 with FP8 weights (>= 1.6x our bf16 W3). PART=b: W2 with FP8 weights (>= 1.3x our bf16 W2).
# PART=c: every GPU test. PART=d: a W3 step profile with FP8 weights, then W3 and W2 with FP8
# weights again, each against FP8's own floor (compiled_serve/bench/floor.py). PART=f: the FP8 KV
# cache's GPU tests, then W2 with FP8 weights and an FP8 KV cache. Carry: .whl .gputok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source bench/device_setup.sh >/dev/null 2>&1
export PYTHONUNBUFFERED=1 COMPILED_SERVE_TEST_SMOLLM2_TOKENIZER=$PWD/.gputok
CLI="python3 -c 'import sys; from compiled_serve.cli import main; sys.exit(main(sys.argv[1:]))'"
case "${PART:-a}" in
a) timeout 120 python3 -m pytest -q -p no:cacheprovider -rfEs --timeout=100 tests/kernels/test_quantized_fp8.py 2>&1 | tail -4
   eval "timeout 240 $CLI bench latency --quantization fp8 --results-dir $OUT/fp8" 2>&1 | grep -v "^DEBUG" | tail -12 ;;
b) eval "timeout 330 $CLI bench throughput --workload W2 --quantization fp8 --results-dir $OUT/fp8" 2>&1 \
     | grep -v "^DEBUG" | tail -12 ;;
d) timeout 200 python3 bench/step_profile.py --workload W3 --quantization fp8 --profile-steps 20 --out "$OUT" 2>&1 \
     | grep -v "^DEBUG" | head -40
   eval "timeout 150 $CLI bench latency --quantization fp8 --results-dir $OUT/fp8" 2>&1 | grep -v "^DEBUG" | tail -9
   eval "timeout 200 $CLI bench throughput --workload W2 --quantization fp8 --results-dir $OUT/fp8" 2>&1 \
     | grep -v "^DEBUG" | tail -9 ;;
e) timeout 200 python3 bench/step_profile.py --workload W3 --quantization fp8 --profile-steps 20 --out "$OUT" 2>&1 \
     | grep -v -E "^DEBUG|INFO" | head -45 ;;
f) timeout 200 python3 -m pytest -q -p no:cacheprovider -rfEs --timeout=150 tests/kernels/test_fp8_kv_cache.py \
     tests/engine/test_fp8_kv_cache_engine.py tests/kernels/test_triton_paged_attention.py tests/kernels/test_quantized_fp8.py \
     tests/passes/test_layer_regions.py 2>&1 | tail -6
   eval "timeout 300 $CLI bench throughput --workload W2 --quantization fp8 --kv-cache-dtype fp8 --results-dir $OUT/fp8kv" \
     2>&1 | grep -v -E "^DEBUG|INFO" | tail -9 ;;
c) timeout 400 python3 -m pytest -q -p no:cacheprovider -m gpu -rfEs --timeout=150 --continue-on-collection-errors tests 2>&1 \
     | tee "$OUT/gpu_tests.log" | tail -8 ;;
esac
