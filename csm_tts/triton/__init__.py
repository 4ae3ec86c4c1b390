"""What the Triton model adapters (`model_repository/*/1/model.py`) share: reading config parameters, error
responses whose message carries the Triton code, and cancellation across the `tts` ensemble.

Nothing here imports `triton_python_backend_utils` (it exists only inside the backend stub); functions that build
Triton objects take that module as an argument, so this package is unit-tested without a server.
"""
