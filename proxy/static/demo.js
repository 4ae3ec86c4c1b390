// The demo page: "types" a text like an LLM, sends it to WS /stream chunk by chunk, plays the streamed PCM gaplessly.
//
// Protocol (docs/api.md): ws://host/stream?mode=stream&binary=true&format=f32le, a first {"config": {...}} message,
// then one {"text": ...} message per chunk. Audio comes as binary frames (16-byte header: seq, chunk_id, index,
// samples as little-endian uint32, then PCM); each text chunk ends with a JSON {"type": "end", ...} message. Every
// server message carries `seq` (0, 1, 2, ... with no gaps), which the page checks.
//
// API keys: HTTP requests send `Authorization: Bearer <key>`; a browser cannot set headers on a WebSocket, so the
// key travels as a subprotocol, ["csm-tts", "bearer.<key>"], and the server answers with "csm-tts". Without a key no
// subprotocol is offered at all (a server without keys then needs to know nothing about it).

import { SAMPLE_RATE, createPlayer, encodeWav } from "./pcm-player.js";

const $ = (id) => document.getElementById(id);
const HEADER_BYTES = 16;
const PREROLL_MS = 100; // the first chunk is 160 ms, so it starts playing as soon as it arrives
const MAX_PREROLL_MS = 2000;
const TOO_MANY_PENDING = "Too many pending text chunks";

function setState(state) {
  document.body.dataset.state = state;
}

// -- API key ---------------------------------------------------------------------------------------------------------
export function authHeaders(key) {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export function wsProtocols(key) {
  return key ? ["csm-tts", `bearer.${key}`] : [];
}

// -- what went wrong, in words -------------------------------------------------------------------------------------
export function explainHttp(status, error, retryAfter) {
  const detail = error ? `: ${error}` : "";
  const retry = retryAfter ? ` Retry in ${retryAfter} s.` : "";
  if (status === 401) return `The server needs an API key, or the key is wrong (401)${detail}`;
  if (status === 403) return `Not allowed (403)${detail}`;
  if (status === 422) return `Bad input (422)${detail}`;
  if (status === 429) return `Rate-limited (429)${detail}.${retry}`;
  if (status === 503) return `The server is full or not ready (503)${detail}.${retry}`;
  return `HTTP ${status}${detail}`;
}

export function explainServerError(message) {
  if (message.startsWith(TOO_MANY_PENDING)) return `The server is busy with earlier chunks: ${message}`;
  if (message.startsWith("Invalid request")) return `Bad input: ${message}`;
  if (/\b(full|UNAVAILABLE|no Triton replica|Too many)\b/i.test(message)) return `The server is full: ${message}`;
  if (/\b(rate|429)\b/i.test(message)) return `Rate-limited: ${message}`;
  return message;
}

export function explainClose(code, reason) {
  const why = reason ? ` (${reason})` : "";
  const known = {
    1001: "The server is shutting down",
    1008: "The server closed the connection: policy violation, e.g. this page did not read fast enough",
    1009: "The server closed the connection: a message was too large",
    1011: "The server hit an internal error",
    1013: "The server is overloaded: try again later",
  };
  return `${known[code] || `The connection closed unexpectedly (code ${code})`}${why}`;
}

// -- LLM-style typing and chunking --------------------------------------------------------------------------------
const ENDS = {
  sentence: /[.!?…]["'”’)\]]*$/,
  clause: /[.!?…,;:]["'”’)\]]*$/,
  words: null,
};

// Words are released at `rate` per second; text chunks are cut where an LLM client would cut them for speech: at the
// end of a sentence (or clause), or after `maxWords` words.
export class Chunker {
  constructor(mode, maxWords) {
    this.end = ENDS[mode];
    this.maxWords = maxWords;
    this.text = "";
    this.words = 0;
  }

  add(word) {
    this.text += word;
    if (!word.trim()) return null;
    this.words += 1;
    if (this.words >= this.maxWords || (this.end && this.end.test(word.trim()))) return this.flush();
    return null;
  }

  flush() {
    const text = this.text.trim();
    this.text = "";
    this.words = 0;
    return text ? text : null;
  }
}

function median(values) {
  if (values.length === 0) return null;
  const s = [...values].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

// -- one utterance: a WebSocket session ------------------------------------------------------------------------------
class Session {
  constructor(options, ui) {
    this.options = options;
    this.ui = ui;
    this.texts = []; // every text chunk, in order: {text, span, state, sentAt, firstAudioAt, endAt, ...}
    this.unsent = []; // cut, not yet sent
    this.inFlight = []; // sent, no end yet (the server answers in order)
    this.maxInFlight = 2; // one being generated, one queued at the server, so it starts without a round trip
    this.nextSeq = 0;
    this.seqErrors = 0;
    this.audioMessages = 0;
    this.receivedSamples = 0;
    this.pcm = []; // received chunks as sent (Float32Array or Int16Array), for the WAV
    this.seqToText = new Map();
    this.errors = [];
    this.typingDone = false;
    this.closing = false;
    this.stopped = false;
    this.finished = new Promise((resolve) => { this.finish = resolve; });
  }

  log(message, kind = "info") {
    this.ui.log(message, kind);
  }

  fail(message) {
    this.errors.push(message);
    this.ui.showError(message);
    this.log(message, "error");
  }

  async run() {
    setState("connecting");
    this.context = new AudioContext({ sampleRate: SAMPLE_RATE, latencyHint: "interactive" });
    await this.context.resume();
    this.player = await createPlayer(this.context, this.options.player, {
      prerollMs: PREROLL_MS,
      maxPrerollMs: MAX_PREROLL_MS,
      tap: this.options.tap,
    });
    this.player.drained.then(() => this.onDrained());
    this.log(`player: ${this.player.kind}, AudioContext at ${this.context.sampleRate} Hz`);
    if (!(await this.connect())) {
      this.abort();
      this.player.stop();
      return this.finished; // the drained player ends the session
    }
    setState("speaking");
    if (this.options.mode === "all") {
      this.cut(this.options.text.trim());
      this.typingDone = true;
      this.pump();
    } else {
      this.type();
    }
    return this.finished;
  }

  // Open the socket and configure the session; false (with the reason shown) when that fails.
  async connect() {
    const url = new URL("/stream", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = new URLSearchParams({ mode: "stream", binary: "true", format: this.options.format }).toString();
    this.url = url;
    try {
      this.ws = new WebSocket(url, wsProtocols(this.options.key));
    } catch (e) {
      const hint = this.options.key ? " (an API key may only hold letters, digits and !#$%&'*+-.^_`|~)" : "";
      this.fail(`Cannot open the WebSocket: ${e.message}${hint}`);
      return false;
    }
    this.ws.binaryType = "arraybuffer";
    const opened = await new Promise((resolve) => {
      this.ws.onopen = () => resolve(true);
      this.ws.onclose = () => resolve(false);
    });
    if (!opened) {
      this.fail(await this.diagnoseHandshake());
      return false;
    }
    if (this.options.key && this.ws.protocol !== "csm-tts") {
      this.fail(`The server did not accept the csm-tts subprotocol (got "${this.ws.protocol}")`);
      this.ws.close();
      return false;
    }
    this.ws.onmessage = (event) => this.onMessage(event.data);
    this.ws.onclose = (event) => this.onClose(event);
    const configured = new Promise((resolve) => { this.onConfigured = resolve; });
    this.ws.send(JSON.stringify({ config: this.options.config }));
    const ok = await configured;
    if (ok) this.log(`connected; session config ${JSON.stringify(this.sessionConfig)}`);
    return ok;
  }

  // A browser does not say why a WebSocket handshake failed; the same URL without the upgrade gets the proxy's JSON
  // error (origin, query, too many sockets, API key), or the plain "needs a WebSocket upgrade" when the HTTP side
  // is fine and the upgrade itself was refused.
  async diagnoseHandshake() {
    try {
      const response = await fetch(this.url.href.replace(/^ws/, "http"), { headers: authHeaders(this.options.key) });
      const body = await response.json().catch(() => ({}));
      if (response.status === 400 && /upgrade/i.test(body.error || "")) {
        return this.options.key
          ? "The WebSocket was refused with an API key: this server may not accept keys on WebSockets"
          : "The WebSocket connection failed (is a proxy in between blocking WebSockets?)";
      }
      return explainHttp(response.status, body.error, response.headers.get("Retry-After"));
    } catch (e) {
      return `The server cannot be reached: ${e.message}`;
    }
  }

  // -- text ------------------------------------------------------------------------------------------------------
  type() {
    const words = this.options.text.split(/(?<=\s)/); // each word keeps its trailing whitespace
    const chunker = new Chunker(this.options.chunking, this.options.chunkWords);
    const interval = 1000 / this.options.rate;
    let i = 0;
    const step = () => {
      if (this.stopped) return;
      if (i < words.length) {
        this.ui.typed(words[i]);
        const chunk = chunker.add(words[i]);
        i += 1;
        if (chunk) this.cut(chunk);
        this.typingTimer = setTimeout(step, interval);
      } else {
        const rest = chunker.flush();
        if (rest) this.cut(rest);
        this.typingDone = true;
        this.ui.typingDone();
        this.checkComplete();
      }
    };
    step();
  }

  cut(text) {
    if (!text) return;
    const entry = { text, state: "queued", index: this.texts.length };
    entry.span = this.ui.chunkSpan(entry);
    this.texts.push(entry);
    this.unsent.push(entry);
    this.pump();
  }

  pump() {
    while (!this.closing && this.inFlight.length < this.maxInFlight && this.unsent.length > 0) {
      const entry = this.unsent.shift();
      entry.sentAt = performance.now();
      this.setEntry(entry, "sent");
      this.inFlight.push(entry);
      this.ws.send(JSON.stringify({ text: entry.text }));
      this.log(`sent text chunk ${entry.index}: "${entry.text}"`);
    }
    this.player.expect(this.inFlight.length > 0);
  }

  setEntry(entry, state) {
    entry.state = state;
    this.ui.markChunk(entry);
  }

  // -- server messages -------------------------------------------------------------------------------------------
  checkSeq(seq) {
    if (seq !== this.nextSeq) {
      this.seqErrors += 1;
      this.fail(`Message out of order: seq ${seq}, expected ${this.nextSeq}`);
    }
    this.nextSeq = seq + 1;
  }

  onMessage(data) {
    if (this.stopped) {
      // Stopped: what was already on its way (audio, end) is dropped; only the order is still checked.
      if (data instanceof ArrayBuffer) this.checkSeq(new DataView(data).getUint32(0, true));
      else this.checkSeq(JSON.parse(data).seq);
      return;
    }
    if (data instanceof ArrayBuffer) return this.onAudio(data);
    let message;
    try {
      message = JSON.parse(data);
    } catch (e) {
      return this.fail(`The server sent invalid JSON: ${e.message}`);
    }
    if (typeof message.seq === "number") this.checkSeq(message.seq);
    const type = message.type || (message.error ? "error" : "message");
    if (type === "config") {
      this.sessionConfig = message.config;
      this.onConfigured(true);
    } else if (type === "end") {
      this.onEnd(message);
    } else if (type === "error") {
      this.onError(message);
    } else if (type === "cancelled") {
      this.log(`cancelled ${message.dropped} text chunk(s)`);
    } else if (type === "closed") {
      this.log("the server closed the session");
    }
  }

  onAudio(buffer) {
    if (buffer.byteLength < HEADER_BYTES) return this.fail(`A binary frame of ${buffer.byteLength} bytes has no header`);
    const header = new DataView(buffer, 0, HEADER_BYTES);
    const seq = header.getUint32(0, true);
    const chunkId = header.getUint32(4, true);
    const index = header.getUint32(8, true);
    const samples = header.getUint32(12, true);
    this.checkSeq(seq);
    const bytes = this.options.format === "f32le" ? 4 : 2;
    if (buffer.byteLength !== HEADER_BYTES + samples * bytes) {
      return this.fail(`Frame ${seq}: ${buffer.byteLength - HEADER_BYTES} bytes of PCM for ${samples} samples`);
    }
    const entry = this.inFlight[0]; // the server generates the text chunks one at a time, in order
    if (!entry) return this.fail(`Audio (seq ${seq}) for no pending text chunk`);
    const expectedIndex = entry.messages ?? 0;
    if ((entry.chunkId !== undefined && entry.chunkId !== chunkId) || index !== expectedIndex) {
      this.fail(`Frame ${seq}: chunk ${chunkId} index ${index}, expected chunk ${entry.chunkId} index ${expectedIndex}`);
    }
    if (entry.chunkId === undefined) {
      entry.chunkId = chunkId;
      entry.firstAudioAt = performance.now();
    }
    entry.messages = index + 1;
    let pcm;
    let floats;
    if (this.options.format === "f32le") {
      pcm = new Float32Array(buffer, HEADER_BYTES, samples);
      floats = pcm;
    } else {
      pcm = new Int16Array(buffer.slice(HEADER_BYTES)); // slice: an Int16Array view needs an even offset anyway
      floats = Float32Array.from(pcm, (v) => v / 32767);
    }
    this.pcm.push(pcm);
    this.audioMessages += 1;
    this.receivedSamples += samples;
    this.seqToText.set(seq, entry);
    this.player.push(seq, floats);
  }

  onEnd(message) {
    const entry = this.inFlight.shift();
    if (!entry) return this.fail(`An end message (seq ${message.seq}) for no pending text chunk`);
    entry.endAt = performance.now();
    entry.serverSamples = message.samples;
    entry.serverMessages = message.audio_messages;
    entry.processingMs = message.processing_time_ms;
    entry.durationMs = message.duration_ms;
    entry.watermarked = message.watermarked;
    if (entry.chunkId === undefined) entry.chunkId = message.chunk_id;
    if (entry.state !== "speaking") this.setEntry(entry, "generated");
    this.log(`text chunk ${entry.index} done: ${message.audio_messages} audio messages, ` +
      `${(message.duration_ms / 1000).toFixed(2)} s of audio in ${(message.processing_time_ms / 1000).toFixed(2)} s` +
      `${message.watermarked ? ", watermarked" : ""}`);
    this.pump();
    this.checkComplete();
  }

  onError(message) {
    const text = explainServerError(String(message.error));
    if (String(message.error).startsWith(TOO_MANY_PENDING) && this.inFlight.length > 0) {
      // Refused at once, not queued: the last chunk sent goes back to the front of the line, and fewer are kept in
      // flight from now on (the server's limit is lower than this page's).
      const entry = this.inFlight.pop();
      this.unsent.unshift(entry);
      this.setEntry(entry, "queued");
      this.maxInFlight = Math.max(1, this.inFlight.length);
      this.log(text, "warn");
      return;
    }
    if (!this.configuredOnce()) {
      this.fail(text);
      return this.onConfigured(false);
    }
    const entry = this.inFlight.shift();
    if (entry) {
      entry.error = text;
      this.setEntry(entry, "failed");
    }
    this.fail(entry ? `Text chunk ${entry.index}: ${text}` : text);
    this.pump();
    this.checkComplete();
  }

  configuredOnce() {
    return this.sessionConfig !== undefined;
  }

  onClose(event) {
    if (this.closing && (event.code === 1000 || this.stopped)) return;
    if (!this.configuredOnce()) this.onConfigured(false);
    this.fail(explainClose(event.code, event.reason));
    this.abort();
  }

  // -- the end ---------------------------------------------------------------------------------------------------
  checkComplete() {
    if (this.closing || !this.typingDone || this.unsent.length > 0 || this.inFlight.length > 0) return;
    this.closing = true;
    this.player.expect(false);
    this.player.finish();
    this.ws.send(JSON.stringify({ done: true }));
  }

  abort() {
    this.stopped = true;
    this.closing = true;
    clearTimeout(this.typingTimer);
    for (const entry of [...this.inFlight, ...this.unsent]) this.setEntry(entry, "failed");
    this.inFlight = [];
    this.unsent = [];
    this.player.expect(false);
    this.player.finish();
  }

  stop() {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ cancel: true }));
      this.ws.send(JSON.stringify({ done: true }));
    }
    this.abort();
    this.player.stop();
    this.log("stopped");
  }

  onDrained() {
    for (const entry of this.texts) if (entry.state === "generated" || entry.state === "speaking") this.setEntry(entry, "done");
    this.end(this.errors.length > 0 ? "error" : this.stopped ? "stopped" : "done");
  }

  async end(state) {
    if (this.ended) return;
    this.ended = true;
    this.endedAt = performance.now();
    if (this.stopped && this.ws && this.ws.readyState === WebSocket.OPEN) {
      // After Stop the server answers the cancel and the done, then closes: wait for that (1 s at most), so that its
      // replies are read rather than dropped by a close of our own.
      const closed = new Promise((resolve) => this.ws.addEventListener("close", resolve, { once: true }));
      await Promise.race([closed, new Promise((resolve) => setTimeout(resolve, 1000))]);
    }
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.close(); // usually the server has closed it
    if (this.player.tap) await this.player.tap.flush();
    await this.context.close();
    setState(state);
    this.finish(state);
  }

  // Which text chunk is playing now: the one whose audio message the player started last.
  markPlaying() {
    const entry = this.seqToText.get(this.player.stats.lastSeq);
    if (!entry) return;
    for (const e of this.texts) {
      if (e === entry) break;
      if (e.state === "speaking" || e.state === "generated") this.setEntry(e, "done");
    }
    if (entry.state === "sent" || entry.state === "generated") this.setEntry(entry, "speaking");
  }

  stats() {
    const player = this.player ? this.player.stats : {};
    const sent = this.texts.filter((e) => e.sentAt !== undefined);
    const ended = this.texts.filter((e) => e.endAt !== undefined);
    // Per text chunk: from the moment the server could start it (sent, and the previous chunk finished) to its
    // first audio, and to its end. The first chunk's first-audio time is the classic time to first audio.
    let previousEnd = 0;
    const latencies = [];
    let busyMs = 0;
    for (const e of ended) {
      const start = Math.max(e.sentAt, previousEnd);
      if (e.firstAudioAt !== undefined) latencies.push(e.firstAudioAt - start);
      busyMs += e.endAt - start;
      previousEnd = e.endAt;
    }
    const audioMs = ended.reduce((sum, e) => sum + (e.durationMs || 0), 0);
    const processingMs = ended.reduce((sum, e) => sum + (e.processingMs || 0), 0);
    const first = this.texts[0];
    return {
      state: document.body.dataset.state,
      player: this.player ? this.player.kind : null,
      textsCut: this.texts.length,
      textsSent: sent.length,
      textsEnded: ended.length,
      texts: sent.map((e) => e.text),
      chunkIds: sent.map((e) => e.chunkId ?? null),
      audioMessages: this.audioMessages,
      receivedSamples: this.receivedSamples,
      serverSamples: ended.reduce((sum, e) => sum + e.serverSamples, 0),
      serverAudioMessages: ended.reduce((sum, e) => sum + e.serverMessages, 0),
      playedSamples: player.played ?? 0,
      chunksPlayed: player.chunksPlayed ?? 0,
      bufferedSamples: player.buffered ?? 0,
      prerollSamples: player.preroll ?? 0,
      underruns: player.underruns ?? 0,
      underrunSamples: player.underrunSamples ?? 0,
      underrunMs: ((player.underrunSamples ?? 0) * 1000) / SAMPLE_RATE,
      waits: player.waits ?? 0,
      playOrderErrors: player.orderErrors ?? 0,
      seqErrors: this.seqErrors,
      ttfaMs: first && first.firstAudioAt !== undefined ? first.firstAudioAt - first.sentAt : null,
      ttfaHeardMs: first && this.player && this.player.startedAt !== null ? this.player.startedAt - first.sentAt : null,
      chunkTtfaMedianMs: median(latencies),
      rtf: audioMs > 0 ? busyMs / audioMs : null,
      serverRtf: audioMs > 0 ? processingMs / audioMs : null,
      watermarked: ended.map((e) => e.watermarked),
      errors: [...this.errors],
    };
  }

  wav() {
    return encodeWav(this.pcm, this.options.format);
  }
}

// -- the page ------------------------------------------------------------------------------------------------------
const ui = {
  log(message, kind = "info") {
    const item = document.createElement("li");
    item.className = `log-${kind}`;
    item.textContent = `${(performance.now() / 1000).toFixed(2)} s  ${message}`;
    $("log").append(item);
    item.scrollIntoView({ block: "nearest" });
  },
  showError(message) {
    $("error").textContent = message;
    $("error").hidden = false;
  },
  clear() {
    $("error").hidden = true;
    $("error").textContent = "";
    $("typed").replaceChildren();
    $("log").replaceChildren();
    this.loose = null;
  },
  typed(word) {
    // Words not yet cut into a chunk are shown as loose text at the end.
    if (!this.loose) {
      this.loose = document.createElement("span");
      this.loose.className = "loose";
      $("typed").append(this.loose);
    }
    this.loose.textContent += word;
  },
  chunkSpan(entry) {
    const span = document.createElement("span");
    span.className = "chunk queued";
    span.textContent = entry.text;
    span.title = `text chunk ${entry.index}`;
    if (this.loose) this.loose.remove();
    this.loose = null;
    $("typed").append(span, " ");
    return span;
  },
  typingDone() {
    if (this.loose && !this.loose.textContent.trim()) this.loose.remove();
  },
  markChunk(entry) {
    entry.span.className = `chunk ${entry.state}`;
    if (entry.error) entry.span.title = entry.error;
  },
};

function readOptions() {
  const number = (id) => {
    const raw = $(id).value.trim();
    return raw === "" ? null : Number(raw);
  };
  const config = { speaker_id: Number($("speaker").value) };
  const maxAudio = number("max-audio");
  if (maxAudio !== null) config.max_audio_length_ms = maxAudio;
  const seed = number("seed");
  if (seed !== null) {
    if (!Number.isSafeInteger(seed) || seed < 0) throw new Error("Seed: a whole number from 0 to 2^53-1, or empty");
    config.seed = seed;
  }
  if ($("watermark").value) config.watermark = $("watermark").value === "true";
  if ($("context").value) config.context = $("context").value === "true";
  const rate = number("rate");
  if (!(rate > 0)) throw new Error("Typing rate: a number of words per second above 0");
  const chunkWords = number("chunk-words");
  if (!Number.isInteger(chunkWords) || chunkWords < 1) throw new Error("N words: a whole number from 1");
  const text = $("text").value;
  if (!text.trim()) throw new Error("Write some text first");
  return {
    text,
    mode: $("mode").value,
    rate,
    chunking: $("chunking").value,
    chunkWords,
    format: $("format").value,
    player: $("player").value,
    key: $("api-key").value.trim(),
    tap: new URLSearchParams(location.search).get("tap") === "1",
    config,
  };
}

function formatMs(ms) {
  return ms === null || ms === undefined ? "–" : `${Math.round(ms)} ms`;
}

function render(session) {
  const s = session.stats();
  const seconds = (samples) => `${(samples / SAMPLE_RATE).toFixed(2)} s`;
  $("s-ttfa").textContent = s.ttfaMs === null ? "–"
    : `${formatMs(s.ttfaMs)}${s.chunkTtfaMedianMs !== null ? ` (median per chunk ${formatMs(s.chunkTtfaMedianMs)})` : ""}`;
  $("s-ttfa-heard").textContent = formatMs(s.ttfaHeardMs);
  $("s-rtf").textContent = s.rtf === null ? "–" : `${s.rtf.toFixed(2)} (server ${s.serverRtf.toFixed(2)})`;
  $("s-texts").textContent = `${s.textsSent} / ${s.textsEnded}`;
  $("s-chunks").textContent = `${s.audioMessages} / ${s.chunksPlayed}${s.playOrderErrors || s.seqErrors ? " OUT OF ORDER" : " in order"}`;
  $("s-audio").textContent = `${seconds(s.receivedSamples)} / ${seconds(s.playedSamples)}`;
  $("s-buffer").textContent = `${formatMs((s.bufferedSamples * 1000) / SAMPLE_RATE)} / ${formatMs((s.prerollSamples * 1000) / SAMPLE_RATE)}`;
  $("s-underruns").textContent = `${s.underruns}${s.underruns ? ` (${formatMs(s.underrunMs)} of silence)` : ""}`;
  $("s-waits").textContent = String(s.waits);
  $("s-player").textContent = s.player ?? "–";
}

// The waveform of what is playing and its level, from an AnalyserNode after the player.
function meter(session) {
  const canvas = $("wave");
  const g = canvas.getContext("2d");
  const analyser = session.player.analyser;
  const data = new Float32Array(analyser.fftSize);
  const draw = () => {
    analyser.getFloatTimeDomainData(data);
    let sum = 0;
    for (const v of data) sum += v * v;
    const rms = Math.sqrt(sum / data.length);
    const db = rms > 0 ? 20 * Math.log10(rms) : -Infinity;
    $("level-bar").style.width = `${Math.max(0, Math.min(100, ((db + 60) / 60) * 100))}%`;
    g.clearRect(0, 0, canvas.width, canvas.height);
    g.strokeStyle = "#2f7d6d";
    g.lineWidth = 1.5;
    g.beginPath();
    const mid = canvas.height / 2;
    for (let i = 0; i < data.length; i++) {
      const x = (i / (data.length - 1)) * canvas.width;
      const y = mid - Math.max(-1, Math.min(1, data[i])) * mid * 0.95;
      if (i === 0) g.moveTo(x, y);
      else g.lineTo(x, y);
    }
    g.stroke();
  };
  return draw;
}

let current = null;

async function speak() {
  let options;
  try {
    options = readOptions();
  } catch (e) {
    ui.showError(e.message);
    setState("error");
    window.csmDemo.finished += 1;
    return;
  }
  ui.clear();
  $("start").disabled = true;
  $("stop").disabled = false;
  $("download").disabled = true;
  const session = new Session(options, ui);
  current = session;
  window.csmDemo.session = session;
  let draw = null;
  const timer = setInterval(() => {
    if (session.player) {
      session.markPlaying();
      render(session);
      draw = draw || meter(session);
      draw();
    }
  }, 50);
  let state;
  try {
    state = await session.run();
  } catch (e) {
    session.fail(`The page failed: ${e.message}`);
    if (session.context) session.context.close();
    setState("error");
    state = "error";
  }
  clearInterval(timer);
  if (session.player) render(session);
  session.log(`finished: ${state}`);
  $("start").disabled = false;
  $("stop").disabled = true;
  $("download").disabled = session.receivedSamples === 0;
  window.csmDemo.finished += 1;
}

function download() {
  if (!current) return;
  const url = URL.createObjectURL(current.wav());
  const link = document.createElement("a");
  link.href = url;
  link.download = "speech.wav";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function checkServer() {
  const badge = $("server");
  badge.textContent = "checking the server…";
  badge.className = "badge";
  try {
    const response = await fetch("/health", { headers: authHeaders($("api-key").value.trim()) });
    const body = await response.json();
    if (response.ok) {
      // With API keys on, only an operator key sees the details; anyone else gets {"status": "ok"}.
      const wm = body.watermark;
      const model = body.triton ? ` · model ${body.triton.model}` : "";
      const mark = wm ? ` · watermark ${wm.enabled === false ? "off" : "on"} by default` : "";
      badge.textContent = `ready${model}${mark}`;
      badge.className = "badge ok";
    } else {
      badge.textContent = `not ready: ${body.error || explainHttp(response.status, body.error)}`;
      badge.className = "badge bad";
    }
  } catch (e) {
    badge.textContent = `the server cannot be reached: ${e.message}`;
    badge.className = "badge bad";
  }
}

function init() {
  for (let i = 0; i < 32; i++) $("speaker").append(new Option(`Speaker ${i}`, String(i)));
  const syncMode = () => {
    const typing = $("mode").value === "type";
    for (const id of ["rate", "chunking", "chunk-words"]) $(id).disabled = !typing;
  };
  $("mode").addEventListener("change", syncMode);
  syncMode();
  // Enter in a field would submit the form (and the CSP forbids form actions): it starts speaking instead.
  $("options").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!$("start").disabled) speak();
  });
  $("start").addEventListener("click", speak);
  $("stop").addEventListener("click", () => current && current.stop());
  $("download").addEventListener("click", download);
  $("api-key").addEventListener("change", checkServer); // the key is sent as Authorization: Bearer
  $("start").disabled = false;
  setState("idle");
  checkServer();
}

function base64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

// For tests and benchmarks: the current session's counters as the page shows them, and (with ?tap=1) the samples
// that reached the speakers, as base64 little-endian float32.
window.csmDemo = {
  session: null,
  finished: 0, // utterances finished (done, stopped or failed)
  stats: () => (window.csmDemo.session ? window.csmDemo.session.stats() : null),
  played: () => {
    const tap = window.csmDemo.session && window.csmDemo.session.player && window.csmDemo.session.player.tap;
    return tap ? base64(new Uint8Array(tap.samples().buffer)) : null;
  },
};

init();
