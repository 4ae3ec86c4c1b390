"""The parse layer: each surface's request (native REST body and query, WebSocket message, OpenAI body) through one
typed pydantic model into ONE internal job value (`job.SpeechJob`), with the exact error messages of docs/api.md.

No aiohttp, no gRPC (an import-linter contract in pyproject.toml): everything here is a plain function of plain
values, tested without a server. Limits and defaults come from csm_tts/limits.py, which the engine reads too.
"""
