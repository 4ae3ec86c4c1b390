"""The answer's bytes: the one audio renderer (audio.py: PCM and encoded formats, chunk by chunk, in the bounded
thread pool of offload.py), the wire framing of SSE and WebSocket messages (frames.py), HTTP audio responses
(http.py), and the index page (index_page.py)."""
