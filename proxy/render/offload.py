"""The bounded thread pool for the CPU work the event loop must never do: audio encoding (PyAV, PCM conversion),
reference decoding and resampling, WAV/base64 and JSON of large bodies (a 90 s clip is ~6 MB of base64).

One pool per app with PROXY_CPU_THREADS workers, by default one fewer than the cores the process may run on (at
least one): a core stays free for the event loop, which otherwise waits for the CPU and the GIL behind busy workers
(docs/benchmarks.md: p99 lag 12-20 ms with one worker on two cores, 34-44 ms with four). A burst of requests queues
for a worker instead of starting a thread each or blocking the loop. The work is cut into short calls (base64 in
slices, JSON with the base64 spliced in, PCM and PyAV frames in pieces: proxy/render/pcm.py, encoders.py) because
one C call over a 90 s clip holds the GIL for 10-40 ms, which the loop would wait for.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
# base64 input per slice: a multiple of 3 bytes, so the slices' base64 concatenate to the whole's. Small enough
# that one slice holds the GIL for ~0.1 ms (one 786 KB call held it for ~5 ms, json.dumps of 6 MB for ~40 ms).
B64_SLICE = 3 * (1 << 14)


def default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))  # the CPUs this process may use (a container's cpuset)
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 2
    return max(1, cores - 1)


class Offload:
    def __init__(self, threads: int | None = None):
        threads = threads or default_threads()
        self.threads = threads
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="proxy-cpu")

    async def run(self, function: Callable[..., T], *args) -> T:
        return await self.wait(self.submit(function, *args))

    def submit(self, function: Callable[..., T], *args) -> Future:
        """The job itself: a caller that may be cancelled keeps it, to know when the worker is really done."""
        return self.executor.submit(function, *args)

    @staticmethod
    async def wait(job: Future):
        return await asyncio.wrap_future(job)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def base64_text(data: bytes) -> str:
    """base64 of `data`, slice by slice (each slice a short C call, so the GIL changes hands in between)."""
    return "".join(base64.b64encode(data[i : i + B64_SLICE]).decode("ascii") for i in range(0, len(data), B64_SLICE))


def json_with_base64(fields: dict, name: str, data: bytes) -> bytes:
    """`fields` as JSON bytes, with field `name` (None in `fields`, for its place) set to the base64 of `data` (run it
    in the pool). The base64 text is spliced in rather than passed through json.dumps, which would scan megabytes in
    one call holding the GIL; base64's alphabet needs no escaping. `"name": null` with bare quotes can only be the
    key itself: inside JSON strings quotes are escaped."""
    key = f"{json.dumps(name)}: "
    head, found, tail = json.dumps({**fields, name: None}).partition(key + "null")
    assert found, name
    parts = [head.encode(), key.encode(), b'"', base64_text(data).encode("ascii"), b'"', tail.encode()]
    return b"".join(parts)
