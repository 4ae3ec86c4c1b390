"""The aiohttp proxy in front of Triton: the documented REST / WebSocket TTS API on top of gRPC streaming.

`python -m proxy` starts it; configuration comes from the environment (proxy/settings.py, docs/api.md).
The proxy never imports torch: it only speaks gRPC to Triton and encodes audio.
"""

NAME = "csm-tts-proxy"
__version__ = "0.1.0"
