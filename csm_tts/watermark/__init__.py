"""Streaming silentcipher watermarking (Sony's 44.1 kHz model) for 24 kHz TTS audio.

This package imports nothing: import its modules directly, so that its torch-free modules (the proxy's watermark
options) can be imported without torch or numpy.

* `weights`: constants, the loaded weights (`WatermarkModel`, `load_watermark_model`) and random test weights.
* `dsp`: STFT framing, synthesis, message scaling and causal BatchNorm shared by the encoders and the detector.
* `streaming`: `StreamingWatermarker`, frame by frame over an unbounded stream; `watermark_together`, one pass over
  many streams (each network layer once for all of them).
* `reference`: `encode_clip`, the whole-clip reference encoder (the tests' oracle), and `encode_stream`.
* `detection`: reading the key back (`decode`, `message_symbols`) and `sdr_db`.
* `streams`: `WatermarkStreams`, the per-stream table the Triton `watermarker` model keeps between requests, applied
  one chunk per stream per pass (`process_batch`), with the minimum message length.
* `batching`: `ChunkQueue`, the model's queue: what each pass takes, and the chunks of cancelled streams it drops.
"""
