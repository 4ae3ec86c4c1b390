"""`python -m proxy`: serve the API on PROXY_HOST:PROXY_PORT (configuration from the environment, docs/api.md)."""

from __future__ import annotations

import asyncio
import logging
import sys

from proxy import NAME, __version__
from proxy.app import create_app
from proxy.appkeys import API_KEYS
from proxy.logs import configure_logging
from proxy.server import serve
from proxy.settings import Settings, SettingsError


def main() -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as e:
        print(f"{NAME}: invalid configuration: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("proxy")
    try:
        app = create_app(settings)  # reads the API keys and the voice presets: a bad one stops the proxy here
    except SettingsError as e:
        print(f"{NAME}: invalid configuration: {e}", file=sys.stderr)
        return 2
    replicas = [
        *settings.triton_grpc_urls,
        *([f"service {settings.triton_grpc_service}"] if settings.triton_grpc_service else []),
    ]
    log.info("%s %s: Triton %s (model %s)", NAME, __version__, ", ".join(replicas), settings.triton_model)
    keys = app[API_KEYS]
    log.info("API keys: %s", f"{len(keys)} configured" if keys is not None else "off (PROXY_API_KEYS_FILE is not set)")
    asyncio.run(serve(app, settings.host, settings.port, settings.drain_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
