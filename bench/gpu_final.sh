#!/usr/bin/env bash
# One short device call: every GPU-marked test, then the sampler timings (top-k/top-p rows now on
# the chunked threshold search). Usage on the device: bash bench/gpu_final.sh; results under $OUT.
source bench/device_setup.sh
export PYTHONUNBUFFERED=1
[ -d .gputok ] && export COMPILED_SERVE_TEST_SMOLLM2_TOKENIZER=$PWD/.gputok  # the SmolLM2 tokenizer, saved
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout ${TEST_TIMEOUT:-170} python3 -m pytest -q -p no:cacheprovider -m gpu -rfEs --timeout=120 tests \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -40
timeout 60 python3 -m pytest -q -p no:cacheprovider -rfEs tests/kernels/test_quantized_fp8.py 2>&1 | tee "$OUT/fp8_tests.log" | tail -5
timeout ${BENCH_TIMEOUT:-60} python3 bench/sampler_bench.py --out "$OUT" 2>&1 | tee "$OUT/sampler_bench.log" | tail -20
