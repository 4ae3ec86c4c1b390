"""The speech runtime: CSM-1B loading, the frame-by-frame engine, the cross-stream scheduler, streaming codec
decode, the chunk schedule and the parsing of Triton requests into generation requests."""
