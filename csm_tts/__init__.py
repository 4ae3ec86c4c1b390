"""Streaming CSM-1B text-to-speech for NVIDIA Triton: engine, streaming codec, watermark and local tooling.

Nothing in this package imports `triton_python_backend_utils`; the Triton models under `model_repository/` are thin
adapters over these modules, so everything here can be unit-tested and reused without a server.
"""

SAMPLE_RATE = 24_000
FRAME_MS = 80
SAMPLES_PER_FRAME = SAMPLE_RATE * FRAME_MS // 1000  # 1920
