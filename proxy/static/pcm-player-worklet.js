// The audio thread's half of the gapless player (the main thread's half is pcm-player.js).
//
// Chunks of 24 kHz float samples arrive over the port in stream order and are played back to back from one queue:
// sample n of the output is sample n of the stream, with no gap and no overlap between chunks, whatever their sizes.
// Playback starts once `preroll` samples are buffered (or nothing more is coming). Running dry while audio is still
// expected is an underrun: it is counted, silence is played until the (doubled) pre-roll is buffered again, and the
// silence is counted too. Running dry while no text is being generated (the LLM has not written the next words yet)
// is a wait, not an underrun.

class PcmPlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions || {};
    this.preroll = o.prerollSamples || 2400;
    this.maxPreroll = o.maxPrerollSamples || 48000;
    this.queue = []; // {seq, data: Float32Array}, in arrival order
    this.offset = 0; // read position inside queue[0]
    this.buffered = 0;
    this.state = "idle"; // idle (nothing to play) | priming (waiting for the pre-roll) | playing
    this.starving = false; // priming after an underrun: the silence played is underrun time
    this.expecting = false; // the main thread has a text chunk being generated
    this.finished = false; // no more audio will come
    this.stopped = false;
    this.stats = {
      played: 0, // stream samples written to the output
      underruns: 0,
      underrunSamples: 0, // silence played during underruns
      waits: 0, // ran dry while no audio was expected
      chunksPlayed: 0,
      lastSeq: -1,
      orderErrors: 0, // a chunk started whose seq is not above the previous one
      preroll: this.preroll,
      buffered: 0,
      startFrame: -1, // currentFrame at which the first stream sample was output
    };
    this.sinceReport = 0;
    this.reportEvery = Math.round(sampleRate / 20); // 50 ms
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(m) {
    if (m.type === "chunk") {
      this.queue.push({ seq: m.seq, data: m.samples });
      this.buffered += m.samples.length;
    } else if (m.type === "expect") {
      this.expecting = m.value;
    } else if (m.type === "finish") {
      this.finished = true;
    } else if (m.type === "stop") {
      this.queue = [];
      this.buffered = 0;
      this.finished = true;
      this.stopped = true;
    }
  }

  report(type) {
    this.stats.buffered = this.buffered;
    this.stats.preroll = this.preroll;
    this.port.postMessage({ type, stats: { ...this.stats }, state: this.state });
  }

  process(inputs, outputs) {
    const output = outputs[0];
    const out = output[0];
    const n = out.length;
    let i = 0;
    if (this.state !== "playing" && this.buffered > 0) {
      const nothingMoreSoon = this.finished || !this.expecting;
      if (this.buffered >= this.preroll || nothingMoreSoon) {
        this.state = "playing";
        this.starving = false;
      }
    }
    if (this.state === "playing") {
      while (i < n && this.queue.length > 0) {
        const head = this.queue[0];
        if (this.offset === 0) {
          if (head.seq <= this.stats.lastSeq) this.stats.orderErrors++;
          this.stats.lastSeq = head.seq;
          this.stats.chunksPlayed++;
          if (this.stats.startFrame < 0) {
            this.stats.startFrame = currentFrame + i;
            this.report("started");
          }
        }
        const take = Math.min(n - i, head.data.length - this.offset);
        out.set(head.data.subarray(this.offset, this.offset + take), i);
        i += take;
        this.offset += take;
        this.buffered -= take;
        this.stats.played += take;
        if (this.offset === head.data.length) {
          this.queue.shift();
          this.offset = 0;
        }
      }
      if (i < n) {
        if (this.expecting && !this.finished) {
          this.stats.underruns++;
          this.preroll = Math.min(this.maxPreroll, this.preroll * 2);
          this.state = "priming";
          this.starving = true;
        } else {
          if (!this.finished) this.stats.waits++;
          this.state = "idle";
        }
      }
    }
    if (i < n) {
      out.fill(0, i);
      if (this.starving) this.stats.underrunSamples += n - i;
    }
    for (let c = 1; c < output.length; c++) output[c].set(out);

    this.sinceReport += n;
    if (this.sinceReport >= this.reportEvery) {
      this.sinceReport = 0;
      this.report("status");
    }
    if (this.finished && this.buffered === 0) {
      this.report("drained");
      return false; // nothing more to play: the node may be collected
    }
    return true;
  }
}

registerProcessor("pcm-player", PcmPlayerProcessor);

// A tap on what reaches the speakers, for tests (the page's ?tap=1): passes its input through and sends copies of it
// to the main thread, so that a test can compare the played samples with the streamed ones.
class OutputTapProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = new Float32Array(sampleRate); // one second per message
    this.filled = 0;
    this.port.onmessage = () => {
      this.send();
      this.port.postMessage({ type: "flushed" });
    };
  }

  send() {
    if (this.filled === 0) return;
    const samples = this.block.slice(0, this.filled);
    this.port.postMessage({ type: "samples", samples }, [samples.buffer]);
    this.filled = 0;
  }

  process(inputs, outputs) {
    const input = inputs[0].length > 0 ? inputs[0][0] : null; // no input channel: nothing connected plays
    const out = outputs[0][0];
    if (input) out.set(input);
    else out.fill(0);
    if (this.filled + out.length > this.block.length) this.send();
    this.block.set(out, this.filled);
    this.filled += out.length;
    return true;
  }
}

registerProcessor("output-tap", OutputTapProcessor);
