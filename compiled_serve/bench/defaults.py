"""Every default of `compiled-serve bench`, in one place."""

from __future__ import annotations

# Where a bench run differs from EngineConfig's defaults (a flag still overrides these; every
# other setting is EngineConfig's). The compiled_serve row of PERF.md ran with these figures.
ENGINE_DEFAULTS: dict[str, object] = {
    "max_num_seqs": 256,
    "max_num_batched_tokens": 8192,
    "dtype": "bfloat16",  # PERF.md's workloads are bf16, on the CPU too
}

# Sampling: temperature 1 with a per-request seed (the request's index), EOS ignored, so every
# request produces exactly its drawn output length and the run is reproducible.
TEMPERATURE = 1.0

RESULTS_DIR = "bench/results"
DOCS_PAGE = "docs/benchmarks.md"
PLOT_FILE = "benchmarks.png"  # written next to the docs page

# W4: Poisson arrival rates (requests per second) and the seed of the inter-arrival draws (its
# own generator, so the requests themselves match the other engines' exactly).
SERVE_RATES = (2.0, 8.0, 32.0)
ARRIVAL_SEED = 1
SERVER_START_TIMEOUT_S = 900.0

# W3: the one request is run this many times; the median run is reported.
LATENCY_REPEATS = 3
