"""`compiled-serve bench`: the PERF.md workloads (W1-W4), their physical floor, and the report.

Files, bottom up: `workloads` (the requests, exactly as PERF.md draws them), `floor` (the
physical limit of a workload on measured ceilings), `ceilings` (copy bandwidth and matmul rate,
measured each run), `throughput` / `latency` / `serve` (the runs), `record` (one run's JSON),
`report` (table, JSON files, docs page) and `cli`.
"""
