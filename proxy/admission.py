"""Who may start a stream: the drain (503), the watermark policy (403), the API key's limits (429 + Retry-After),
the proxy's own stream limit (503). Plain Python: the endpoints call it through proxy/requests.py's `admit` and
`check`, right after parsing and BEFORE reference decoding, context building or Triton, so every refusal is
answered before a 200 or a WebSocket upgrade. Who the caller is (401) is decided earlier, at the door
(proxy/middleware.py), before a body is read.

`admit` returns a `Lease`: the key's stream slot, held until the stream ends (`with lease:` frees it on any exit),
the stream's Triton request id and its metrics. Endpoints that start several streams (/stream/chunks, WS /stream)
`check` before their 200 or upgrade, then `admit` each text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from proxy.auth import ApiKey, LimitReached
from proxy.drain import Drain
from proxy.errors import ApiError
from proxy.metrics import ProxyMetrics
from proxy.parse.job import GenerateOptions
from proxy.scope import RequestScope
from proxy.upstream.pool import TritonPool


@dataclass(frozen=True)
class WatermarkPolicy:
    """Whether clients may turn the watermark off, or choose their own key (CSM_WATERMARK_ALLOW_DISABLE,
    CSM_WATERMARK_ALLOW_CUSTOM_KEY; an API key may say otherwise for its holder)."""

    allow_disable: bool = True
    allow_custom_key: bool = True
    watermark_default: bool = True  # what requests without `watermark` get (CSM_WATERMARK_ENABLED)

    def for_key(self, key: ApiKey | None) -> WatermarkPolicy:
        if key is None:
            return self
        return WatermarkPolicy(
            allow_disable=self.allow_disable if key.allow_watermark_off is None else key.allow_watermark_off,
            allow_custom_key=(
                self.allow_custom_key if key.allow_custom_watermark_key is None else key.allow_custom_watermark_key
            ),
            watermark_default=self.watermark_default,
        )

    def check(self, options: GenerateOptions) -> None:
        """403 for a forbidden choice; never a silent fallback to the default."""
        if options.watermark is False and self.watermark_default and not self.allow_disable:
            raise ApiError(403, "Turning the watermark off is not allowed here (watermark: false)")
        if options.watermark_key is not None and not self.allow_custom_key:
            raise ApiError(403, "Choosing a watermark key is not allowed here (watermark_key)")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, headers={"WWW-Authenticate": 'Bearer realm="csm-tts"'})


def too_many(limit: LimitReached) -> ApiError:
    return ApiError(429, limit.message, headers={"Retry-After": str(limit.retry_after_s)})


def draining_error() -> ApiError:
    return ApiError(
        503, "The server is shutting down; retry (another replica will answer)", headers={"Retry-After": "1"}
    )


class Lease:
    """One admitted Triton stream: the key's stream slot (released exactly once), its Triton request id, its
    metrics. `with lease:` releases the slot on any exit; `SpokenGeneration` reports first audio and the end."""

    def __init__(self, admission: Admission, scope: RequestScope):
        self.admission = admission
        self.scope = scope
        self._held = True

    def triton_request_id(self) -> str:
        return self.scope.next_triton_request_id()

    def first_audio(self, seconds: float) -> None:
        self.admission.metrics.stream_first_audio(self.scope, seconds)

    def closed(self, seconds: float, audio_seconds: float, failed: bool) -> None:
        """The stream ended (it had started): its metrics, then the slot."""
        if self._held:
            self.admission.metrics.stream_closed(self.scope, seconds, audio_seconds, failed)
        self.release()

    def release(self) -> None:
        if self._held:
            self._held = False
            if self.scope.key is not None:
                self.scope.key.release_stream()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Admission:
    """The per-stream decision: drain, watermark policy, key limits, the proxy's own stream limit."""

    def __init__(self, metrics: ProxyMetrics, policy: WatermarkPolicy, drain: Drain):
        self.metrics = metrics
        self.policy = policy
        self.drain = drain

    def check(self, scope: RequestScope, asked: Iterable[GenerateOptions] = (), pool: TritonPool | None = None) -> None:
        """Raise the refusal a stream of these options would get now; takes nothing."""
        if self.drain.active:
            self.refuse("draining", draining_error())
        policy = self.policy.for_key(scope.key)
        for options in asked:
            try:
                policy.check(options)
            except ApiError as e:
                self.refuse("forbidden", e)
        if scope.key is not None:
            try:
                scope.key.check_room()
            except LimitReached as e:
                self.refuse("rate_limited", too_many(e))
        if pool is not None and pool.active_streams >= pool.max_streams:
            self.refuse("full", pool.full_error())

    def admit(self, scope: RequestScope, options: GenerateOptions, pool: TritonPool | None = None) -> Lease:
        """`check`, then take the key's stream slot: the caller holds it until its stream ends."""
        self.check(scope, (options,), pool)
        if scope.key is not None:
            try:
                scope.key.take_stream()
            except LimitReached as e:
                self.refuse("rate_limited", too_many(e))
        self.metrics.stream_admitted(scope)
        return Lease(self, scope)

    def refuse(self, reason: str, error: Exception):
        self.metrics.rejections.labels(reason).inc()
        raise error
