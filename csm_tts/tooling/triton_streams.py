"""Client helpers for live tests: stream one request over Triton's gRPC bidirectional stream."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException


@dataclass
class StreamResult:
    chunks: list[dict] = field(default_factory=list)  # one dict of output arrays per response
    error: InferenceServerException | None = None
    arrival_s: list[float] = field(default_factory=list)  # seconds since the request was sent

    @property
    def audio(self) -> np.ndarray:
        parts = [c["audio"] for c in self.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def make_inputs(text: str, context=None) -> list[InferInput]:
    """context: list of (speaker, text, audio float32) tuples."""
    inputs = [InferInput("text", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    if context:
        arrays = {
            "context_text": np.array([t.encode() for _, t, _ in context], dtype=np.object_),
            "context_speaker": np.array([s for s, _, _ in context], dtype=np.int32),
            "context_audio": np.concatenate([a for _, _, a in context]).astype(np.float32),
            "context_audio_lengths": np.array([len(a) for _, _, a in context], dtype=np.int64),
        }
        for name, array in arrays.items():
            dtype = (
                "BYTES"
                if array.dtype == np.object_
                else {"int32": "INT32", "int64": "INT64", "float32": "FP32"}[str(array.dtype)]
            )
            tensor = InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
    return inputs


async def stream(
    url: str,
    model: str,
    text: str,
    parameters: dict | None = None,
    context=None,
    inputs=None,
    stop_after_chunks: int | None = None,
    outputs: tuple[str, ...] | None = None,
    request_id: str = "",
    stop: asyncio.Event | None = None,
) -> StreamResult:
    """Send one request and read responses until is_last, an error, `stop_after_chunks`, or a response that arrives
    once `stop` is set (then hang up)."""
    client = grpcclient.InferenceServerClient(url)
    result = StreamResult()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def requests():
        yield {
            "model_name": model,
            "inputs": inputs if inputs is not None else make_inputs(text, context),
            "parameters": parameters or {},
            "request_id": request_id,
        }
        await done.wait()  # the stream must stay open until the last response has arrived

    try:
        async for response, error in client.stream_infer(requests()):
            if error is not None:
                result.error = error
                break
            names = outputs or [o.name for o in response.get_response().outputs]
            result.chunks.append({name: response.as_numpy(name) for name in names})
            result.arrival_s.append(loop.time() - start)
            if bool(result.chunks[-1]["is_last"][0]):
                break
            if stop_after_chunks is not None and len(result.chunks) >= stop_after_chunks:
                break
            if stop is not None and stop.is_set():
                break
    finally:
        done.set()
        await client.close()
    return result
