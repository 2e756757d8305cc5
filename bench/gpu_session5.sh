#!/usr/bin/env bash
# Session 5's device call: the GPU tests of the structured-output and async paths, W4 through the
# server (the first request after ready, with the start-up gc freeze), and the structured-output
# overheads on the H200 (issue 10; random smollm2-135m weights with the real tokenizer, .gputok).
# Carry: .whl .gputok
source bench/device_setup.sh >/dev/null 2>&1
export PYTHONUNBUFFERED=1 COMPILED_SERVE_TEST_SMOLLM2_TOKENIZER=$PWD/.gputok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CLI="python3 -c 'import sys; from compiled_serve.cli import main; sys.exit(main(sys.argv[1:]))'"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -rfEs --timeout=120 \
  tests/engine/test_constrained_warmup.py tests/engine/test_sampler.py tests/kernels/test_fused_sampling.py \
  tests/engine/test_async_step_gpu.py tests/engine/test_cuda_graphs.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -6
eval "timeout 240 $CLI bench serve --results-dir $OUT" 2>&1 | grep -v -E "^DEBUG|httpx" | tail -10
timeout 100 python3 bench/structured_bench.py --device cuda --dummy-weights .gputok --out "$OUT" 2>&1 | tail -3
timeout 90 python3 bench/structured_bench.py --device cuda --dummy-weights .gputok --late-vs-drain 1,64 \
  --out "$OUT" 2>&1 | tail -3
