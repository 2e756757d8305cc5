"""GPU time of a callable, replayed from a CUDA graph (no host launch cost in the figure)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def time_graph(fn: Callable[[int], object], calls: int = 16, reps: int = 5) -> float:
    """Median us per call of a CUDA graph holding `calls` calls fn(0), fn(1), ... (fn may use the
    index to rotate its inputs, so that the data come from memory rather than L2)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]
