#!/usr/bin/env bash
# Issue 12: W3 (Llama-8B shape, batch 1, `compiled-serve bench latency`) through the in-process
# engine ("uni") and through the TP=1 worker path ("mp": engine/tp_engine.py with a process group
# of one, CUDA graphs mirrored), each in a fresh process, then the GPU-marked TP tests. Target: mp
# within 3% of uni in decode tok/s. Usage on the device:
#   bash bench/gpu_tp_worker_path.sh                 # uni, then mp
#   ORDER="mp uni mp uni" bash bench/gpu_tp_worker_path.sh   # alternate, to see the drift
source bench/device_setup.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CLI="python3 -c 'import sys; from compiled_serve.cli import main; sys.exit(main(sys.argv[1:]))'"
if [ -z "$SKIP_TESTS" ]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -rfEs tests/distributed/test_tp_graphs.py \
    2>&1 | tee "$OUT/tp_gpu_tests.log" | tail -15
fi
for backend in ${ORDER:-uni mp}; do
  dir="$OUT/w3-$backend-$(date +%s)"; mkdir -p "$dir"
  eval "timeout ${BENCH_TIMEOUT:-420} $CLI bench latency --results-dir $dir --tensor-parallel-size 1 \
    --distributed-executor-backend $backend $BENCH_ARGS" 2>&1 | grep -v "^DEBUG" | tail -8
  python3 - "$dir" "$backend" <<'PY'
import json, pathlib, sys
for path in pathlib.Path(sys.argv[1]).glob("*.json"):
    r = json.loads(path.read_text())["result"]
    print(f"W3 {sys.argv[2]}: decode {r['decode_tok_s']:.1f} tok/s, ttft {r['ttft_s'] * 1e3:.0f} ms, "
          f"startup {r['startup_s']:.0f} s; cuda graphs: {r['engine_report']['cuda_graphs']}")
PY
done
