"""After start-up, the objects that live for the whole process leave the garbage collector's view.

An engine process holds ~500k objects once it is ready (fx graphs, Inductor's compiled modules,
the tokenizer, torch's own registries): one full (generation-2) collection walks them all, about
170 ms on the 2-core CPU. CPython runs that collection when enough new long-lived objects have
piled up, which first happens under the first requests after "ready" and then now and then
mid-serving, as a stall of the step loop. `gc.freeze()` moves everything alive now into a
permanent generation that no collection scans (the same thing vLLM does after start-up); what
requests allocate afterwards is collected as before. Nothing is leaked: frozen objects were
reachable anyway, and cycles among them are kept as they would have been.

Only processes this package owns freeze: the engine core's and `serve`'s. The offline `LLM()`
runs in a user's process, where frozen objects that later become garbage (a dropped engine, the
user's own cycles) would never be collected, so it does not.
"""

from __future__ import annotations

import gc
import time


def freeze_long_lived_objects() -> float:
    """Collect once, then freeze what is left; returns the seconds it took."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - start
