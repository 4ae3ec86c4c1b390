"""`python -m proxy`: serve the API on PROXY_HOST:PROXY_PORT (configuration from the environment, docs/api.md)."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from proxy import NAME, __version__
from proxy.app import create_app
from proxy.settings import Settings, SettingsError


def main() -> int:
    try:
        settings = Settings.from_env()
        app = create_app(settings)
    except SettingsError as e:
        print(f"{NAME}: invalid configuration: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("proxy").info(
        "%s %s: Triton %s (model %s)", NAME, __version__, ", ".join(settings.triton_grpc_urls), settings.triton_model
    )
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        handler_cancellation=True,
        shutdown_timeout=10.0,
        access_log=logging.getLogger("aiohttp.access"),
        print=lambda *_: logging.getLogger("proxy").info("listening on http://%s:%d", settings.host, settings.port),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
