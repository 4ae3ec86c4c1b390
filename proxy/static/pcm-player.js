// Gapless playback of streamed PCM chunks, and the WAV writer. Two players with one interface:
//
//   WorkletPlayer  an AudioWorklet (pcm-player-worklet.js) plays one queue of samples on the audio thread;
//   BufferPlayer   AudioBufferSourceNodes scheduled back to back on the AudioContext's clock, for pages that are not
//                  a secure context (plain http:// on another host than localhost), where AudioWorklet is missing.
//
// Both start after an adaptive pre-roll (it doubles after each underrun), count underruns only while audio is still
// expected (a text chunk is being generated), and report: played, buffered, underruns, underrun time, chunks played
// and whether they played in stream order. Nothing here knows about WebSockets: push(seq, samples) is the input.

export const SAMPLE_RATE = 24000;

class PlayerBase {
  constructor(context, output, options = {}) {
    this.context = context;
    this.prerollSamples = Math.round((options.prerollMs ?? 100) * SAMPLE_RATE / 1000);
    this.maxPrerollSamples = Math.round((options.maxPrerollMs ?? 2000) * SAMPLE_RATE / 1000);
    this.analyser = context.createAnalyser();
    this.analyser.fftSize = 2048;
    this.analyser.connect(output);
    this.stats = {
      played: 0, underruns: 0, underrunSamples: 0, waits: 0, chunksPlayed: 0, lastSeq: -1, orderErrors: 0,
      preroll: this.prerollSamples, buffered: 0, startFrame: -1,
    };
    this.state = "idle";
    this.startedAt = null; // performance.now() time at which the first sample was heard
    this.drained = new Promise((resolve) => { this.onDrained = resolve; });
  }

  // The performance.now() time at which the context's clock reads `contextTime` at the speakers.
  heardAt(contextTime) {
    const ts = this.context.getOutputTimestamp();
    if (!ts.performanceTime) return performance.now();
    return ts.performanceTime + (contextTime - ts.contextTime) * 1000;
  }
}

export class WorkletPlayer extends PlayerBase {
  constructor(context, output, options) {
    super(context, output, options);
    this.kind = "worklet";
    this.node = new AudioWorkletNode(context, "pcm-player", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { prerollSamples: this.prerollSamples, maxPrerollSamples: this.maxPrerollSamples },
    });
    this.node.port.onmessage = (event) => this.onMessage(event.data);
    this.node.connect(this.analyser);
  }

  onMessage(m) {
    this.stats = m.stats;
    this.state = m.state;
    if (m.type === "started") this.startedAt = this.heardAt(m.stats.startFrame / this.context.sampleRate);
    if (m.type === "drained") {
      this.node.disconnect();
      this.onDrained(this.stats);
    }
  }

  push(seq, samples) {
    // Transfer, not copy: the main thread does not touch these samples again (it keeps its own copy for the WAV).
    const copy = samples.slice();
    this.node.port.postMessage({ type: "chunk", seq, samples: copy }, [copy.buffer]);
  }

  expect(value) { this.node.port.postMessage({ type: "expect", value }); }
  finish() { this.node.port.postMessage({ type: "finish" }); }
  stop() { this.node.port.postMessage({ type: "stop" }); }
}

export class BufferPlayer extends PlayerBase {
  constructor(context, output, options) {
    super(context, output, options);
    this.kind = "buffers";
    this.pending = []; // chunks waiting for the pre-roll
    this.pendingSamples = 0;
    this.scheduled = []; // {start, end, samples, seq, source}: queued on the clock, not yet over
    this.nextFrame = 0; // where the next chunk starts on the context's clock, in samples (exact, unlike seconds)
    this.expecting = false;
    this.expectingSince = 0;
    this.dryAt = null;
    this.finished = false;
    // The main thread sees the clock only between render bursts: a chunk due within `margin` may already be late,
    // so it counts as having run dry (and playback restarts `lead` ahead), rather than as a silent glitch.
    this.margin = Math.max(0.025, 2 * (context.baseLatency || 0));
    this.lead = this.margin + 0.01;
    this.timer = setInterval(() => this.tick(), 50);
  }

  push(seq, samples) {
    const now = this.context.currentTime;
    if (this.state === "playing" && this.nextFrame / SAMPLE_RATE < now + this.margin) {
      // The clock passed the end of the last scheduled chunk: the output ran dry before this chunk came.
      if (this.expecting && this.expectingSince <= this.nextFrame / SAMPLE_RATE) {
        this.stats.underruns++;
        this.dryAt = this.nextFrame; // the silence from here to the restart is underrun time
        this.prerollSamples = Math.min(this.maxPrerollSamples, this.prerollSamples * 2);
      } else {
        this.stats.waits++;
      }
      this.state = "priming";
    }
    this.pending.push({ seq, samples });
    this.pendingSamples += samples.length;
    if (this.state !== "playing") this.maybeStart();
    else this.flush();
  }

  maybeStart() {
    if (this.pendingSamples === 0) return;
    if (this.pendingSamples >= this.prerollSamples || this.finished || !this.expecting) {
      this.state = "playing";
      // On a sample boundary: a start between two samples would be interpolated.
      this.nextFrame = Math.ceil((this.context.currentTime + this.lead) * SAMPLE_RATE);
      if (this.dryAt !== null) {
        this.stats.underrunSamples += this.nextFrame - this.dryAt;
        this.dryAt = null;
      }
      this.flush();
    }
  }

  flush() {
    for (const { seq, samples } of this.pending) {
      const buffer = this.context.createBuffer(1, samples.length, SAMPLE_RATE);
      buffer.copyToChannel(samples, 0);
      const source = this.context.createBufferSource();
      source.buffer = buffer;
      source.connect(this.analyser);
      // One clock: each chunk starts on the sample after the previous one ends. Browsers start buffers with
      // sub-sample accuracy, and frame / rate * rate is not always exactly the frame in doubles: a start a hair
      // late would slip a whole sample (a one-sample gap), so the time asked for is a millionth of a sample early
      // (the interpolation that costs is below 16-bit resolution).
      const start = (this.nextFrame - 1e-6) / SAMPLE_RATE;
      source.start(start);
      if (seq <= this.stats.lastSeq) this.stats.orderErrors++;
      this.stats.lastSeq = seq;
      // Scheduled now or later, never heard before now: the output-clock estimate can be a millisecond early.
      if (this.startedAt === null) this.startedAt = Math.max(performance.now(), this.heardAt(start));
      if (this.stats.startFrame < 0) this.stats.startFrame = this.nextFrame;
      this.nextFrame += samples.length;
      const end = this.nextFrame / SAMPLE_RATE;
      this.scheduled.push({ start, end, samples: samples.length, source, started: false });
    }
    this.pending = [];
    this.pendingSamples = 0;
  }

  tick() {
    const now = this.context.currentTime;
    if (this.state === "priming") this.maybeStart();
    for (const s of this.scheduled) {
      if (s.started || s.start > now) break;
      s.started = true;
      this.stats.chunksPlayed++;
    }
    while (this.scheduled.length > 0 && this.scheduled[0].end <= now) {
      this.stats.played += this.scheduled.shift().samples;
    }
    const inProgress = this.scheduled.length > 0 && this.scheduled[0].start <= now
      ? Math.round((now - this.scheduled[0].start) * SAMPLE_RATE) : 0;
    const queued = this.scheduled.reduce((sum, s) => sum + s.samples, 0) + this.pendingSamples;
    this.stats.buffered = queued - inProgress;
    this.stats.preroll = this.prerollSamples;
    if (this.finished && this.scheduled.length === 0 && this.pendingSamples === 0) {
      clearInterval(this.timer);
      this.analyser.disconnect();
      this.onDrained(this.stats);
    }
  }

  expect(value) {
    if (value && !this.expecting) this.expectingSince = this.context.currentTime;
    this.expecting = value;
    if (!value && this.state === "priming") this.maybeStart();
  }

  finish() {
    this.finished = true;
    this.maybeStart();
  }

  stop() {
    for (const s of this.scheduled) s.source.stop();
    this.scheduled = [];
    this.pending = [];
    this.pendingSamples = 0;
    this.finish();
  }
}

// The samples that reach the speakers (the page's ?tap=1, for tests): see OutputTapProcessor.
export class OutputTap {
  constructor(context) {
    this.node = new AudioWorkletNode(context, "output-tap", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      channelCount: 1,
      channelCountMode: "explicit",
    });
    this.blocks = [];
    this.node.port.onmessage = (event) => {
      if (event.data.type === "samples") this.blocks.push(event.data.samples);
      else if (this.onFlushed) this.onFlushed();
    };
  }

  flush() {
    return new Promise((resolve) => {
      this.onFlushed = resolve;
      this.node.port.postMessage("flush");
    });
  }

  samples() {
    const all = new Float32Array(this.blocks.reduce((sum, b) => sum + b.length, 0));
    let at = 0;
    for (const b of this.blocks) {
      all.set(b, at);
      at += b.length;
    }
    return all;
  }
}

// kind "auto": the AudioWorklet where the page may use one (a secure context), else scheduled buffers.
export async function createPlayer(context, kind, options = {}) {
  // The worklet plays the stream's samples as they are: it needs the context at the stream's rate (buffers are
  // resampled by the browser).
  const native = context.sampleRate === SAMPLE_RATE;
  const worklet = kind === "worklet" || (kind === "auto" && context.audioWorklet && native);
  if ((worklet || options.tap) && !context.audioWorklet) {
    throw new Error("AudioWorklet is not available: the page must be served over https:// or from localhost");
  }
  if (worklet && !native) {
    throw new Error(`This browser runs audio at ${context.sampleRate} Hz, not ${SAMPLE_RATE}: use scheduled buffers`);
  }
  if (context.audioWorklet) await context.audioWorklet.addModule(new URL("pcm-player-worklet.js", import.meta.url));
  let output = context.destination;
  let tap = null;
  if (options.tap) {
    tap = new OutputTap(context);
    tap.node.connect(context.destination);
    output = tap.node;
  }
  const player = worklet ? new WorkletPlayer(context, output, options) : new BufferPlayer(context, output, options);
  player.tap = tap;
  return player;
}

// A WAV file of the streamed samples, exactly as received: 32-bit float (f32le streams) or 16-bit PCM (s16le).
// The samples are copied through typed arrays, which use the platform's byte order: little-endian on every platform
// browsers run on, as WAV requires.
export function encodeWav(chunks, format, sampleRate = SAMPLE_RATE) {
  const float = format === "f32le";
  const bytesPerSample = float ? 4 : 2;
  const samples = chunks.reduce((sum, c) => sum + c.length, 0);
  const dataBytes = samples * bytesPerSample;
  const view = new DataView(new ArrayBuffer(44 + dataBytes));
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF");
  view.setUint32(4, 36 + dataBytes, true);
  text(8, "WAVE");
  text(12, "fmt ");
  view.setUint32(16, 16, true);
  view.setUint16(20, float ? 3 : 1, true); // 3: IEEE float, 1: integer PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, sampleRate, true);
  view.setUint32(28, sampleRate * bytesPerSample, true);
  view.setUint16(32, bytesPerSample, true);
  view.setUint16(34, bytesPerSample * 8, true);
  text(36, "data");
  view.setUint32(40, dataBytes, true);
  const body = float ? new Float32Array(view.buffer, 44, samples) : new Int16Array(view.buffer, 44, samples);
  let at = 0;
  for (const c of chunks) {
    body.set(c, at);
    at += c.length;
  }
  return new Blob([view.buffer], { type: "audio/wav" });
}
