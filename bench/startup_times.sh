#!/bin/bash
# Start-up times of docs/benchmarks.md ("Start-up times on the 2-core CPU machine"):
#   a fresh clone's `make serve` to /health 200 (install included), a second `make serve`,
#   then `LLM()` first and second start, each with an empty build cache of its own.
# Usage: bench/startup_times.sh [WORKDIR]   (default /tmp/compiled-serve-startup); port 8000 must be free.
# Prints one line per run: label, seconds, and the load average when it ended (the machine may be shared).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/compiled-serve-startup}
rm -rf "$WORK" && mkdir -p "$WORK"
git clone -q "$REPO" "$WORK/clone" && cd "$WORK/clone" || exit 1

serve_to_health() {  # $1: label
  local t0 pid
  t0=$(date +%s.%N)
  setsid make serve > "$WORK/$1.log" 2>&1 &
  pid=$!
  until curl -sf -o /dev/null http://127.0.0.1:8000/health; do
    sleep 0.5
    kill -0 "$pid" 2>/dev/null || { echo "$1: make serve exited, see $WORK/$1.log"; return 1; }
  done
  echo "$1 $(echo "$(date +%s.%N) - $t0" | bc) s load $(cut -d' ' -f1 /proc/loadavg)"
  kill -INT -- -"$pid"
  wait "$pid"
}

llm_start() {  # $1: label
  local t0
  t0=$(date +%s.%N)
  .venv/bin/python -c "from compiled_serve import LLM; LLM()
import resource; r = resource.getrusage(resource.RUSAGE_SELF); print(f'CPU {r.ru_utime + r.ru_stime:.1f} s')" \
    > "$WORK/$1.log" 2>&1 || { echo "$1 failed"; return 1; }
  echo "$1 $(echo "$(date +%s.%N) - $t0" | bc) s load $(cut -d' ' -f1 /proc/loadavg) $(grep '^CPU' "$WORK/$1.log")"
}

export COMPILED_SERVE_CACHE_ROOT="$WORK/serve-cache"
serve_to_health serve-fresh-clone
serve_to_health serve-second
export COMPILED_SERVE_CACHE_ROOT="$WORK/llm-cache"
llm_start llm-first
llm_start llm-second
