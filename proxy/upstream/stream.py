"""One Triton request on the bidirectional gRPC stream: `async with pool.stream(...) as s: async for chunk in s`.

The decoupled model sends one response per audio chunk; the request iterator stays open until the last chunk (or an
error) has arrived. Leaving the `async with` early (client gone, cancelled task, exception) cancels the gRPC call,
which cancels the request on the server. A stream that fails before its first chunk moves to another replica.
Knows nothing of HTTP: the caller gives the Triton request id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import numpy as np
from tritonclient.grpc import InferInput

from csm_tts.speech.request import ContextSegment
from csm_tts.triton.errors import split_code
from proxy.upstream.errors import (
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    classify,
    short,
)

if TYPE_CHECKING:
    from proxy.upstream.pool import Replica, TritonPool

log = logging.getLogger("proxy.triton")


@dataclass(frozen=True)
class AudioChunk:
    audio: np.ndarray  # float32, 24 kHz mono
    index: int
    is_last: bool
    watermarked: bool
    key_id: str | None


def make_inputs(text: str, context: Sequence[ContextSegment] = ()) -> list[InferInput]:
    tensor = InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode("utf-8")], dtype=np.object_))
    inputs = [tensor]
    if context:
        arrays = [
            ("context_text", np.array([s.text.encode("utf-8") for s in context], dtype=np.object_), "BYTES"),
            ("context_speaker", np.array([s.speaker for s in context], dtype=np.int32), "INT32"),
            ("context_audio", np.concatenate([s.audio for s in context]).astype(np.float32), "FP32"),
            ("context_audio_lengths", np.array([s.audio.size for s in context], dtype=np.int64), "INT64"),
        ]
        for name, array, dtype in arrays:
            tensor = InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
    return inputs


class TritonStream:
    """`async with pool.stream(...) as stream: async for chunk in stream: ...` -- one Triton request."""

    def __init__(
        self, pool: TritonPool, text: str, parameters: dict, context: Sequence[ContextSegment], request_id: str = ""
    ):
        self.pool = pool
        self.request_id = request_id
        # The Triton request id: csm_1b and the watermarker write it into their log lines for this stream.
        self.request = {
            "model_name": pool.model,
            "inputs": make_inputs(text, context),
            "parameters": parameters,
            "request_id": self.request_id,
        }
        self.replica: Replica | None = None
        self.chunks = 0
        self.finished = False
        self._call = None
        self._done: asyncio.Event | None = None
        self._tried: list[Replica] = []
        self._counted = False

    async def __aenter__(self) -> TritonStream:
        if self.pool.active_streams >= self.pool.max_streams:
            if self.pool.on_full is not None:
                self.pool.on_full()
            raise self.pool.full_error()
        self.pool.active_streams += 1
        self._counted = True
        try:
            await self._open(await self.pool.pick())
        except BaseException:
            self._release()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        self._close_call()
        self._release()

    def _release(self) -> None:
        if self._counted:
            self.pool.active_streams -= 1
            self._counted = False

    async def _open(self, replica: Replica) -> None:
        self._close_call()
        self.replica = replica
        self._tried.append(replica)
        replica.active_streams += 1
        replica.streams_started += 1
        done = self._done = asyncio.Event()
        request = self.request

        async def requests():
            yield request
            await done.wait()  # keep the stream open until the last response (or an error) has arrived

        self._call = replica.client.stream_infer(requests())

    def _close_call(self) -> None:
        if self._call is None:
            return
        self._done.set()  # ends the request iterator: the client half of the stream closes
        if not self.finished:
            self._call.cancel()  # cancels the request on the server: generation stops
        else:
            # The last response is in; let the RPC finish with its OK status in the background rather than leave
            # it to garbage collection, which would cancel it.
            self.pool.drain(self._call)
        self._call = None
        self.replica.active_streams -= 1

    def __aiter__(self):
        return self

    async def __anext__(self) -> AudioChunk:
        if self.finished or self._call is None:
            raise StopAsyncIteration
        while True:
            try:
                async with asyncio.timeout(self.pool.stream_idle_timeout_s):
                    result, error = await self._call.__anext__()
                break
            except StopAsyncIteration:
                self.pool.count_error("ENDED_EARLY")
                raise UpstreamError("Triton ended the stream before its last chunk") from None
            except TimeoutError:
                self.pool.count_error("IDLE_TIMEOUT")
                raise UpstreamTimeout(
                    f"Triton sent nothing for {self.pool.stream_idle_timeout_s:.0f} s; the stream was cancelled"
                ) from None
            except grpc.RpcError as e:
                failure = self._transport_failure(e)
            if self.chunks == 0 and (replica := await self._failover()) is not None:
                log.warning("retrying the stream on %s after: %s", replica.url, failure.message)
                self.finished = False
                await self._open(replica)
                continue
            raise failure
        if error is not None:
            self.finished = True  # the server already ended this request
            code, _ = split_code(error.message())
            self.pool.count_error(code or "UNCODED")
            failure = classify(error.message())
            if self.chunks == 0 and code is None and not await self._model_still_ready():
                # Triton's own error (no code of ours): the model is not (any more) loaded on that replica.
                failure = UpstreamUnavailable(f"Triton cannot serve the model now: {short(error.message())}")
            # Full or not loaded there: another replica may take it.
            if (
                self.chunks == 0
                and isinstance(failure, UpstreamUnavailable)
                and (replica := await self._failover()) is not None
            ):
                log.warning("retrying the stream on %s after: %s", replica.url, failure.message)
                self.finished = False
                await self._open(replica)
                return await self.__anext__()
            raise failure
        chunk = parse_result(result)
        self.chunks += 1
        self.pool.chunks_received += 1
        if chunk.is_last:
            self.finished = True
            self._done.set()
        return chunk

    async def _model_still_ready(self) -> bool:
        """Re-check the replica that just failed a request (bounded by health_timeout_s): is it still serving?"""
        await self.pool.check(self.replica)
        return self.replica.healthy(self.pool.model)

    def _transport_failure(self, e: grpc.RpcError) -> UpstreamError:
        self.finished = True  # the call is over
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        reason = f"{code.name if code else 'ERROR'}: {short(details or '')}"
        self.pool.count_error(f"GRPC_{code.name if code else 'ERROR'}")
        if code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.INTERNAL,
        ):
            self.replica.mark_down(reason)
            return UpstreamUnavailable(f"Triton at {self.replica.url} is unavailable ({reason})")
        return UpstreamError(f"Triton stream failed ({reason})")

    async def _failover(self) -> Replica | None:
        try:
            return await self.pool.pick(exclude=self._tried)
        except UpstreamUnavailable:
            return None


def parse_result(result) -> AudioChunk:
    def scalar(name, default):
        value = result.as_numpy(name)
        return default if value is None or value.size == 0 else value.reshape(-1)[0]

    audio = result.as_numpy("audio")
    audio = np.zeros(0, np.float32) if audio is None else audio.reshape(-1).astype(np.float32, copy=False)
    key_id = scalar("watermark_key_id", None)
    if isinstance(key_id, bytes):
        key_id = key_id.decode("utf-8", "replace")
    return AudioChunk(
        audio=audio,
        index=int(scalar("chunk_index", 0)),
        is_last=bool(scalar("is_last", False)),
        watermarked=bool(scalar("watermarked", False)),
        key_id=key_id or None,
    )
