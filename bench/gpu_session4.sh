#!/usr/bin/env bash
# Session 4's device calls (the re-measure after the H200 attention tiles and bucket-fit chunks).
#   PART=1: the GPU tests of the changed paths, W3 in-process and through the TP=1 worker path
#           (issue 12), W2;   PART=2: W4 through the server, cold compile and warm starts.
source bench/device_setup.sh >/dev/null 2>&1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CLI="python3 -c 'import sys; from compiled_serve.cli import main; sys.exit(main(sys.argv[1:]))'"
if [ "${PART:-1}" = 1 ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu -rfEs --timeout=150 \
    tests/kernels/test_triton_paged_attention.py tests/engine/test_cuda_graphs.py \
    tests/engine/test_async_step_gpu.py tests/distributed/test_tp_graphs.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
  SKIP_TESTS=1 OUT=$OUT timeout 200 bash bench/gpu_tp_worker_path.sh 2>&1 | grep -E "^W3|Error" | tail -6
  eval "timeout 170 $CLI bench throughput --workload W2 --results-dir $OUT" 2>&1 | grep -v "^DEBUG" | tail -8
else
  eval "timeout 170 $CLI bench throughput --workload W2 --results-dir $OUT" 2>&1 | grep -v "^DEBUG" | tail -4
  eval "timeout 230 $CLI bench serve --results-dir $OUT" 2>&1 | grep -v -E "^DEBUG|httpx" | tail -12
  timeout 240 bash bench/gpu_start.sh 2>&1 | tail -14
  # Does a GPU TP test leave a process holding GPU memory behind (part 1's W2 found 80 GiB taken)?
  timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/distributed/test_tp_graphs.py 2>&1 | tail -2
  sleep 3; nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv; ps -eo pid,etime,cmd | grep -i python | grep -v grep | cut -c1-160
fi
