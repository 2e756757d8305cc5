#!/usr/bin/env bash
# Session 9's device call: every GPU test on the code of this session (CPU C kernels, the greedy
# sampler shortcut, the Q8_0 head: none of them runs on CUDA, the call checks nothing else moved),
# then the new CPU kernels' own tests on that host's CPU (another CPU model, another compiler).
# Carry: .whl .gputok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source bench/device_setup.sh >/dev/null 2>&1
export PYTHONUNBUFFERED=1 COMPILED_SERVE_TEST_SMOLLM2_TOKENIZER=$PWD/.gputok
timeout 400 python3 -m pytest -q -p no:cacheprovider -m gpu -rfEs --timeout=150 --continue-on-collection-errors tests 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -8
grep -m1 "model name" /proc/cpuinfo; grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -c -E "vnni"
timeout 120 python3 -m pytest -q -p no:cacheprovider -rfEs --timeout=100 tests/kernels/test_cpu_decode_attention.py \
  tests/kernels/test_cpu_q8_head.py tests/kernels/test_fused_sampling.py 2>&1 | tee "$OUT/cpu_kernel_tests.log" | tail -5
