"""Triton, as the proxy sees it: errors and their codes (errors.py), the replicas with their health (pool.py) and
how they are found (discovery.py), one request's stream (stream.py).

Knows nothing of aiohttp or of the API above it (an import-linter contract in pyproject.toml): what it needs from a
request, such as the Triton request id, is passed in. This file imports nothing, so `errors` loads without gRPC.
"""
