"""The text front-end: what a client writes (LLM prose, markdown, token streams) turned into what CSM is asked to say.

- `normalize`: markdown, code, URLs, e-mail addresses, emoji, invisible characters, numbers, currency, dates, times,
  units and ordinals to plain speakable text, with every character mapped back to its span in the original;
- `budget`: how much text one generation may take, and the split of a long text into such segments;
- `incremental`: the segmenter for text that arrives in pieces (an LLM's tokens);
- `frontend`: what the endpoints call (a whole text, or one cut of a stream, to segments of speech with spans);
- `elevenlabs`, `elevenlabs_contexts`: ElevenLabs' input-streaming WebSocket messages, parsed and answered, and the
  per-connection rules (open contexts, flushed or interrupted).

Standard library plus small pure-Python packages (markdown-it-py, sentencex, num2words, emoji): the proxy imports it
and installs no torch.
"""
