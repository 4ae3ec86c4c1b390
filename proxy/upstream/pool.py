"""The Triton replicas this proxy streams to: one long-lived `tritonclient.grpc.aio` client per replica, their
health, and the choice of a replica for each stream.

`TritonPool` owns one client per replica: the URLs in TRITON_GRPC_URLS and, with TRITON_GRPC_SERVICE, the addresses
its name resolves to (proxy/upstream/discovery.py adds and retires them as they change). A background task checks
every replica (server live/ready and the repository index: each model's state; with a metrics port, each stage's load,
proxy/upstream/stages.py); a stream goes to the healthy replica with the fewest streams in flight. When no replica is
healthy a request re-checks at once (bounded by `health_timeout_s`) and otherwise fails with `UpstreamUnavailable`
(503) right away, never hanging; the gRPC channels retry connecting at most every second, so the proxy recovers by
itself when Triton comes back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE
from tritonclient.utils import InferenceServerException

from csm_tts.speech.request import ContextSegment
from proxy.upstream import stages
from proxy.upstream.errors import UpstreamUnavailable, short
from proxy.upstream.stream import TritonStream

log = logging.getLogger("proxy.triton")

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


@dataclass
class ReplicaHealth:
    live: bool = False
    ready: bool = False
    models: dict[str, dict] = field(default_factory=dict)  # name -> {"state": ..., "reason": ...}
    error: str | None = None
    checked_at: float = 0.0  # time.monotonic()
    load: stages.StageLoad | None = None  # from Triton's metrics port; None when not read (or unreadable: load_error)
    load_error: str | None = None

    def model_ready(self, name: str) -> bool:
        return self.models.get(name, {}).get("state") == "READY"


class Replica:
    def __init__(self, url: str, discovered: bool = False, metrics_port: int | None = None):
        self.url = url
        host = url.rpartition(":")[0]  # "10.0.0.5:8001", "[::1]:8001", "triton:8001"
        self.metrics_url = None if metrics_port is None else f"http://{host}:{metrics_port}/metrics"
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


class TritonPool:
    def __init__(
        self,
        urls: Sequence[str],
        model: str,
        health_interval_s: float = 2.0,
        health_timeout_s: float = 0.5,
        stream_idle_timeout_s: float = 60.0,
        max_streams: int = 128,
        metrics_port: int | None = None,
    ):
        self.model = model
        self.metrics_port = metrics_port  # Triton's metrics port on each replica's host; None: not read
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self.max_streams = max_streams
        self.replicas = [Replica(url, metrics_port=metrics_port) for url in urls]
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
            settings.health_interval_s,
            settings.health_timeout_s,
            settings.stream_idle_timeout_s,
            settings.max_streams,
            settings.triton_metrics_port,
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
        added = [Replica(url, discovered=True, metrics_port=self.metrics_port) for url in wanted if url not in known]
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
            health = ReplicaHealth(error=short(reason), checked_at=time.monotonic())
        if replica.metrics_url is not None and health.ready:
            try:  # a replica whose metrics cannot be read still serves: only its stages are unknown
                health.load = await asyncio.to_thread(stages.read, replica.metrics_url, timeout)
            except (OSError, ValueError) as e:
                health.load_error = short(f"{replica.metrics_url}: {e}")
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

    def behind(self) -> dict[str, list[str]]:
        """Stage -> the serving replicas where it does not keep up, at their last health check (stages.py)."""
        found: dict[str, list[str]] = {}
        for replica in self.healthy():
            for stage in replica.health.load.behind if replica.health.load else ():
                found.setdefault(stage, []).append(replica.url)
        return found

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

    def full_error(self) -> UpstreamUnavailable:
        return UpstreamUnavailable(
            f"The proxy has {self.active_streams} streams open (limit {self.max_streams}); retry later"
        )

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
    def stream(
        self, text: str, parameters: dict, context: Sequence[ContextSegment] = (), request_id: str = ""
    ) -> TritonStream:
        """One Triton request; `request_id` is its Triton request id (the models' log lines carry it)."""
        return TritonStream(self, text, parameters, context, request_id)

    def drain(self, call) -> None:
        task = asyncio.create_task(_drain(call))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)


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
