"""Streaming CSM-1B text-to-speech for NVIDIA Triton.

- `csm_tts.speech`: the speech runtime: checkpoint loading, the frame-by-frame engine (sampling, batching), the
  cross-stream scheduler, exact streaming codec decode, the chunk schedule, parsing Triton requests.
- `csm_tts.watermark`: the streaming silentcipher watermark (weights, DSP, encoder, detection, per-stream table) and
  the watermark options both the proxy and the models read.
- `csm_tts.triton`: what the Triton adapters under `model_repository/` share (config parameters, coded errors,
  cancellation across the ensemble).
- `csm_tts.tooling`: development and deployment tooling the runtime never imports (local Triton, rendering the model
  repository, tiny checkpoints, benchmark statistics).
- `csm_tts.parsing`: one spelling of booleans for environment variables, query strings and request parameters.

Nothing in this package imports `triton_python_backend_utils`, so everything is unit-tested without a server.
This module holds the audio format every part shares, and imports nothing (the proxy has no torch).
"""

SAMPLE_RATE = 24_000
FRAME_MS = 80
SAMPLES_PER_FRAME = SAMPLE_RATE * FRAME_MS // 1000  # 1920
