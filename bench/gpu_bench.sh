#!/usr/bin/env bash
# One device call: the official `compiled-serve bench` runs (each workload in a fresh process,
# ceilings measured first), written under $OUT. Usage on the device:
#   BENCH="throughput latency" bash bench/gpu_bench.sh
source bench/device_setup.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CLI="python3 -c 'import sys; from compiled_serve.cli import main; sys.exit(main(sys.argv[1:]))'"
if [ -n "$SAMPLER" ] && [ -f bench/sampler_bench.py ]; then
  timeout 120 python3 bench/sampler_bench.py --out "$OUT" 2>&1 | tail -20
fi
for cmd in ${BENCH:-throughput latency}; do
  eval "timeout ${BENCH_TIMEOUT:-420} $CLI bench $cmd --results-dir $OUT $BENCH_ARGS" 2>&1 | grep -v "^DEBUG" | tail -25
done
