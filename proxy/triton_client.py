"""Streams to Triton over gRPC: one long-lived `tritonclient.grpc.aio` client per replica, health checks, failover.

`TritonPool` owns one client per replica: the URLs in TRITON_GRPC_URLS and, with TRITON_GRPC_SERVICE, the addresses
its name resolves to (proxy/discovery.py adds and retires them as they change). A background task
checks every replica (server live/ready and the repository index: each model's state); a stream goes to the healthy
replica with the fewest streams in flight. When no replica is healthy a request re-checks at once (bounded by
`health_timeout_s`) and otherwise fails with `UpstreamUnavailable` (503) right away, never hanging; the gRPC channels
retry connecting at most every second, so the proxy recovers by itself when Triton comes back.

`TritonStream` is one request on the bidirectional stream. The decoupled model sends one response per audio chunk;
the request iterator stays open until the last chunk (or an error) has arrived. Leaving the `async with` early
(client gone, cancelled task, exception) cancels the gRPC call, which cancels the request on the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, InferInput
from tritonclient.utils import InferenceServerException

from csm_tts.triton.errors import split_code
from proxy.context import Segment
from proxy.scope import current_scope

log = logging.getLogger("proxy.triton")


class UpstreamError(Exception):
    """Triton failed the request; `status` is what the HTTP API answers."""

    status = 502

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UpstreamUnavailable(UpstreamError):
    """No replica can take the stream now (down, not ready, full, or it went away mid-stream): retry later."""

    status = 503


class UpstreamRejected(UpstreamError):
    """Triton said INVALID_ARG: the request itself is wrong (e.g. too long for the model's context window)."""

    status = 422


class UpstreamTimeout(UpstreamError):
    """Triton sent nothing for TRITON_STREAM_IDLE_TIMEOUT_S: a gateway timeout, not the client's fault."""

    status = 504


# Channel options: the client defaults (large messages: context audio can be several MB) plus a short reconnect
# backoff, so a restarted Triton is found again within about a second instead of gRPC's default of up to 120 s.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 0),
]


def classify(message: str) -> UpstreamError:
    """Map a Triton error message to what the client is told, by its code alone. The csm_1b / tts models start
    their messages with the Triton code name ("INVALID_ARG: ..."; csm_tts/triton/errors.py), since gRPC streams carry
    only the message. Words inside a message decide nothing: "not found" in an INTERNAL error is still a 502.
    Triton's own errors (an unknown or unloaded model) have no code; `TritonStream` tells those apart by the
    replica's state, not by their wording."""
    code, detail = split_code(message)
    if code == "INVALID_ARG":
        return UpstreamRejected(detail)
    if code in ("UNAVAILABLE", "CANCELLED"):  # full, shutting down, or cancelled on the server's side: retry
        return UpstreamUnavailable(f"Triton is busy or unavailable: {detail}")
    return UpstreamError(f"Triton failed the request: {detail}")


@dataclass(frozen=True)
class AudioChunk:
    audio: np.ndarray  # float32, 24 kHz mono
    index: int
    is_last: bool
    watermarked: bool
    key_id: str | None


@dataclass
class ReplicaHealth:
    live: bool = False
    ready: bool = False
    models: dict[str, dict] = field(default_factory=dict)  # name -> {"state": ..., "reason": ...}
    error: str | None = None
    checked_at: float = 0.0  # time.monotonic()

    def model_ready(self, name: str) -> bool:
        return self.models.get(name, {}).get("state") == "READY"


class Replica:
    def __init__(self, url: str, discovered: bool = False):
        self.url = url
        self.discovered = discovered  # from TRITON_GRPC_SERVICE rather than the fixed list
        self.retired = False  # its address left the service: no new streams; closed once its streams end
        self.client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        self.health = ReplicaHealth()
        self.active_streams = 0
        self.streams_started = 0

    def healthy(self, model: str) -> bool:
        return not self.retired and self.health.ready and self.health.model_ready(model)

    def mark_down(self, reason: str) -> None:
        if self.health.ready:
            log.warning("Triton %s marked unavailable: %s", self.url, reason)
        self.health = ReplicaHealth(
            live=False, ready=False, models=self.health.models, error=reason, checked_at=time.monotonic()
        )


def make_inputs(text: str, context: Sequence[Segment] = ()) -> list[InferInput]:
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


class TritonPool:
    def __init__(
        self,
        urls: Sequence[str],
        model: str,
        watermark_model: str = "watermarker",
        health_interval_s: float = 2.0,
        health_timeout_s: float = 0.5,
        stream_idle_timeout_s: float = 60.0,
        max_streams: int = 128,
    ):
        self.model = model
        self.watermark_model = watermark_model
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self.max_streams = max_streams
        self.replicas = [Replica(url) for url in urls]
        self.retired: list[Replica] = []  # gone from the service, still finishing streams
        self.active_streams = 0
        self.chunks_received = 0  # audio responses read from Triton, all streams together
        self.on_upstream_error = None  # callable(code: str), set by the app's metrics
        self.on_full = None  # callable(), when the proxy's own stream limit refuses a stream
        self._task: asyncio.Task | None = None
        self._drains: set[asyncio.Task] = set()
        self._check_lock = asyncio.Lock()
        self._turn = 0

    @classmethod
    def from_settings(cls, settings) -> TritonPool:
        return cls(
            settings.triton_grpc_urls,
            settings.triton_model,
            settings.watermark_model,
            settings.health_interval_s,
            settings.health_timeout_s,
            settings.stream_idle_timeout_s,
            settings.max_streams,
        )

    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.create_task(self._health_loop(), name="triton-health")
        for replica in self.replicas:
            log.info(
                "Triton %s: %s",
                replica.url,
                "ready"
                if replica.healthy(self.model)
                else f"not ready ({replica.health.error or 'model ' + self.model + ' not ready'})",
            )

    async def close(self) -> None:
        for task in [self._task, *self._drains]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in [self._task, *self._drains] if t is not None), return_exceptions=True)
        await asyncio.gather(*(r.client.close() for r in self.replicas + self.retired), return_exceptions=True)

    # -- discovery -------------------------------------------------------------------------------------------------
    async def set_discovered(self, urls: Sequence[str]) -> None:
        """The replicas found behind TRITON_GRPC_SERVICE now: new ones are added (and checked at once), ones whose
        address went away are retired -- no new streams, their running streams finish, then their client closes."""
        wanted = list(dict.fromkeys(urls))
        known = {r.url for r in self.replicas}
        added = [Replica(url, discovered=True) for url in wanted if url not in known]
        gone = [r for r in self.replicas if r.discovered and r.url not in wanted]
        for replica in gone:
            replica.retired = True
            log.info("Triton %s left the service; %d streams still run there", replica.url, replica.active_streams)
        self.replicas = [r for r in self.replicas if r not in gone] + added
        self.retired.extend(gone)
        for replica in added:
            log.info("Triton %s joined the service", replica.url)
        if added:
            await asyncio.gather(*(self.check(r) for r in added))
        await self._close_retired()

    async def _close_retired(self) -> None:
        idle = [r for r in self.retired if r.active_streams == 0]
        self.retired = [r for r in self.retired if r.active_streams > 0]
        await asyncio.gather(*(r.client.close() for r in idle), return_exceptions=True)

    def count_error(self, code: str) -> None:
        if self.on_upstream_error is not None:
            self.on_upstream_error(code)

    # -- health ----------------------------------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.check_all()
                await self._close_retired()
            except Exception:  # never let the loop die
                log.exception("health check failed")

    async def check(self, replica: Replica) -> ReplicaHealth:
        client, timeout = replica.client, self.health_timeout_s
        was_healthy = replica.healthy(self.model)
        try:
            async with asyncio.timeout(timeout + 0.25):
                live, ready, index = await asyncio.gather(
                    client.is_server_live(client_timeout=timeout),
                    client.is_server_ready(client_timeout=timeout),
                    client.get_model_repository_index(client_timeout=timeout),
                )
            models: dict[str, dict] = {}
            for entry in index.models:
                # Several versions: one READY version is enough.
                if models.get(entry.name, {}).get("state") != "READY":
                    models[entry.name] = {"state": entry.state or "UNKNOWN", "reason": entry.reason}
            health = ReplicaHealth(live=bool(live), ready=bool(ready), models=models, checked_at=time.monotonic())
        except (InferenceServerException, grpc.RpcError, TimeoutError, OSError) as e:
            reason = e.message() if isinstance(e, InferenceServerException) else (str(e) or type(e).__name__)
            health = ReplicaHealth(error=_short(reason), checked_at=time.monotonic())
        replica.health = health
        if replica.healthy(self.model) != was_healthy:
            if replica.healthy(self.model):
                log.info("Triton %s is now ready", replica.url)
            else:
                log.warning("Triton %s is now unavailable (%s)", replica.url, health.error or "not ready")
        return health

    async def check_all(self, max_age_s: float | None = None) -> None:
        """Check every replica; with `max_age_s`, results that recent (e.g. from a check that ran while this one
        waited for the lock) are reused, so a burst of requests while Triton is down costs one check, not one each."""
        async with self._check_lock:
            now = time.monotonic()
            replicas = list(self.replicas)
            if max_age_s is not None and all(now - r.health.checked_at < max_age_s for r in replicas):
                return
            await asyncio.gather(*(self.check(r) for r in replicas))

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy(self.model)]

    async def pick(self, exclude: Sequence[Replica] = ()) -> Replica:
        """The healthy replica with the fewest streams in flight (ties in turn); re-checks once when none is."""
        candidates = [r for r in self.healthy() if r not in exclude]
        if not candidates and not exclude:
            await self.check_all(max_age_s=0.25)
            candidates = self.healthy()
        if not candidates:
            if not exclude:  # a failed failover was counted under the error that caused it
                self.count_error("NO_REPLICA")
            raise UpstreamUnavailable(self.unavailable_reason())
        self._turn += 1
        least = min(r.active_streams for r in candidates)
        tied = [r for r in candidates if r.active_streams == least]
        return tied[self._turn % len(tied)]

    def unavailable_reason(self) -> str:
        reasons = [] if self.replicas else ["no replica is known (TRITON_GRPC_SERVICE resolves to nothing yet)"]
        for r in self.replicas:
            if r.health.error:
                reasons.append(f"{r.url}: {r.health.error}")
            elif not r.health.ready:
                reasons.append(f"{r.url}: server not ready")
            else:
                state = r.health.models.get(self.model, {}).get("state", "not loaded")
                reasons.append(f"{r.url}: model {self.model!r} {state.lower()}")
        return "Triton is unavailable: " + "; ".join(reasons)

    # -- streams ---------------------------------------------------------------------------------------------------
    def stream(self, text: str, parameters: dict, context: Sequence[Segment] = ()) -> TritonStream:
        return TritonStream(self, text, parameters, context)

    def drain(self, call) -> None:
        task = asyncio.create_task(_drain(call))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TritonStream:
    """`async with pool.stream(...) as stream: async for chunk in stream: ...` -- one Triton request."""

    def __init__(self, pool: TritonPool, text: str, parameters: dict, context: Sequence[Segment]):
        self.pool = pool
        scope = current_scope()
        self.request_id = scope.next_triton_request_id() if scope is not None else ""
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
            raise UpstreamUnavailable(
                f"The proxy has {self.pool.active_streams} streams open (limit {self.pool.max_streams}); retry later"
            )
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
                failure = UpstreamUnavailable(f"Triton cannot serve the model now: {_short(error.message())}")
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
        reason = f"{code.name if code else 'ERROR'}: {_short(details or '')}"
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


async def _drain(call, timeout_s: float = 5.0) -> None:
    """Read a finished stream to its end (the server closes it once our request iterator is done)."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                await call.__anext__()
    except StopAsyncIteration:
        pass
    except TimeoutError:
        call.cancel()
    except grpc.RpcError:
        pass


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
