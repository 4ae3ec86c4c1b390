"""Triton replicas found by name: TRITON_GRPC_SERVICE (`host:port`) is resolved every TRITON_DISCOVERY_INTERVAL_S
and every address it resolves to becomes a replica, so scaling the Triton StatefulSet needs no configuration edit.

In Kubernetes the name is the headless Service of the StatefulSet (`csm-tts-triton.csm-tts.svc.cluster.local:8001`):
its DNS answer lists one address per pod. Each address gets its own gRPC connection, health checks and stream
count, exactly like a URL of the fixed list (TRITON_GRPC_URLS, which may be used as well). An address that stops
resolving is retired: no new streams go there and the streams running there finish. A failed or empty resolution
keeps the replicas known so far -- a DNS hiccup must not empty the pool; replicas that are really gone fail their
health checks instead.

The resolver is injectable (`create_app(settings, resolver=...)`): the tests put two real local Triton servers
behind one name without touching the machine's DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

from proxy.upstream.pool import TritonPool

log = logging.getLogger("proxy.discovery")

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_addresses(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (the system resolver: /etc/hosts, DNS), sorted and without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def grpc_target(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ipaddress.ip_address(address).version == 6 else f"{address}:{port}"


class ServiceDiscovery:
    def __init__(self, pool: TritonPool, service: str, interval_s: float = 5.0, resolver: Resolver | None = None):
        host, _, port = service.rpartition(":")
        self.pool = pool
        self.host, self.port = host, int(port)
        self.interval_s = interval_s
        self.resolver = resolver or resolve_addresses
        self._task: asyncio.Task | None = None
        self._failing = False

    async def refresh(self) -> None:
        try:
            addresses = await self.resolver(self.host, self.port)
        except (OSError, ValueError) as e:  # socket.gaierror is an OSError
            if not self._failing:
                log.warning(
                    "cannot resolve %s (%s); keeping the %d replicas known", self.host, e, len(self.pool.replicas)
                )
            self._failing = True
            return
        if not addresses:
            if not self._failing:
                log.warning("%s resolves to no address; keeping the replicas known", self.host)
            self._failing = True
            return
        self._failing = False
        await self.pool.set_discovered([grpc_target(a, self.port) for a in addresses])

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="triton-discovery")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
            except Exception:  # never let the loop die
                log.exception("discovery failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
