"""Stopping the in-process engine loop aborts every request the engine holds, including one whose
consumer left after the stop was queued (its own abort then sits behind the stop, never applied)."""

from __future__ import annotations

import asyncio
import threading

from compiled_serve.sampling_params import SamplingParams
from compiled_serve.server.engine_loop import EngineLoop, EngineStoppedError


async def _stop_while_a_consumer_leaves(engine) -> None:
    loop = EngineLoop(engine)
    loop.start()
    handle = await loop.add_request("leaves-late", [1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True))
    kept = await loop.add_request("kept", [4, 5, 6], SamplingParams(max_tokens=400, ignore_eos=True))
    kept_outputs = kept.outputs()
    await kept_outputs.__anext__()  # both are running in the engine
    # Hold the engine thread inside its next step, so the commands below queue up behind it.
    gate, inside = threading.Event(), threading.Event()
    real_step = engine.step

    def held_step():
        inside.set()
        gate.wait(30)
        return real_step()

    engine.step = held_step
    try:
        assert await asyncio.to_thread(inside.wait, 30)
        stopping = asyncio.ensure_future(loop.shutdown(0.0))
        while loop._commands.empty():  # the stop is queued first...
            await asyncio.sleep(0)
        handle.close()  # ...then this consumer leaves: its abort comes after the stop
    finally:
        gate.set()
        del engine.step
    await stopping
    try:
        await kept_outputs.__anext__()
    except EngineStoppedError:
        pass
    else:
        raise AssertionError("the remaining stream did not end with EngineStoppedError")


def test_stop_aborts_every_request_in_the_engine(engine) -> None:
    try:
        asyncio.run(_stop_while_a_consumer_leaves(engine))
        assert not engine.has_unfinished_requests()
    finally:
        for request_id in ("leaves-late", "kept"):  # keep the shared engine clean whatever happened
            engine.abort_request(request_id)
