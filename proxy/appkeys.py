"""The application's parts, as typed aiohttp keys (`request.app[TRITON]`), and the request's own (`request[SCOPE]`).

Named apart from aiohttp's `web`; every key has its real type: the modules it names import nothing from here.
"""

from __future__ import annotations

import weakref

from aiohttp import web

from proxy.admission import Admission
from proxy.auth import ApiKeys
from proxy.connections import ConnectionGuard
from proxy.drain import Drain
from proxy.metrics import ProxyMetrics
from proxy.render.offload import Offload
from proxy.scope import RequestScope
from proxy.settings import Settings
from proxy.upstream.discovery import Resolver
from proxy.upstream.pool import TritonPool
from proxy.voices import VoiceBook

SETTINGS = web.AppKey("settings", Settings)
TRITON = web.AppKey("triton", TritonPool)
WEBSOCKETS = web.AppKey("websockets", weakref.WeakSet)
STARTED = web.AppKey("started", float)
METRICS = web.AppKey("metrics", ProxyMetrics)
ADMISSION = web.AppKey("admission", Admission)
API_KEYS = web.AppKey("api_keys", ApiKeys | None)
DRAIN = web.AppKey("drain", Drain)
RESOLVER = web.AppKey("resolver", Resolver | None)
VOICES = web.AppKey("voices", VoiceBook)
OFFLOAD = web.AppKey("offload", Offload)
CONNECTIONS = web.AppKey("connections", ConnectionGuard)
SCOPE = web.RequestKey("scope", RequestScope)
