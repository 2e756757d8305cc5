#!/usr/bin/env bash
# One device call: set-up, the GPU tests of the step path, then step profiles of the workloads
# named in $WORKLOADS (default W1), written under $OUT. Usage on the device:
#   WORKLOADS="W1" bash bench/gpu_session.sh
source bench/device_setup.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -z "$SKIP_TESTS" ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine/test_async_step_gpu.py \
    tests/engine/test_cuda_graphs.py tests/engine/test_batch_invariance.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi
for w in ${WORKLOADS:-W1}; do
  for s in ${SCHEDULING:-async}; do
    timeout ${PROFILE_TIMEOUT:-400} python3 bench/step_profile.py --workload "$w" --scheduling "$s" --out "$OUT" \
      2>&1 | tee "$OUT/step_profile-$w-$s.log" | tail -45
  done
done
