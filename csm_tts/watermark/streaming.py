"""Streaming silentcipher watermarking (Sony's 44.1 kHz model) for 24 kHz TTS audio.

silentcipher's `encode_wav` works on whole clips: it normalises the power over the clip, its BatchNorm layers use the
statistics of each call, its message framing restarts at every call and its STFT is a process-wide singleton with
mutable state. `StreamingWatermarker` runs the same networks (silentcipher's own `Encoder` / `CarrierDecoder`
modules and weights) frame by frame over an unbounded stream instead:

* 24 kHz -> 44.1 kHz with a streaming soxr resampler (HQ, the quality librosa uses for Sesame's pipeline).
* Our own STFT (n_fft 4096, hop 2048, periodic Hann, reflect padding at the start and the library's zero + reflect
  padding at the end), computed one frame at a time as soon as its window is complete; the library's singleton STFT
  is never used, so watermarkers on many threads share nothing mutable.
* The message position follows the global STFT frame index of the stream (frame t carries symbol t mod 21), so the
  message phase never restarts at a chunk border.
* Every whole-clip statistic has a causal counterpart, computed over everything the stream has produced so far
  (see `CausalMean` and the comments marked "causal:").
* The 3x3 convolutions look one frame ahead. `lookahead_frames` (0-6 for the 44.1 kHz model) says how many of them
  wait for the real next frame; the others use the current frame in its place (their future tap is folded into the
  current one), which adds no delay. With lookahead_frames = receptive field the output equals `encode_clip`, the
  whole-clip reference with the same causal statistics.
* Only the watermark is resampled back: the output is `input + resample_24k(marked_44k - input_44k)`, so the
  original samples pass untouched (no round-trip low-pass) and silence stays exactly silent.

Everything a frame's output depends on is fixed when that frame is computed, so the output does not depend on how
the input is chunked.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import soxr
import torch

from csm_tts import SAMPLE_RATE
from csm_tts.watermark.dsp import (
    RESAMPLER_QUALITY,
    CausalMean,
    batch_norm,
    check_lookahead,
    envelope,
    frame_count,
    input_gain,
    layer_plan,
    padding,
    reshape,
    scaled_message,
    spectrum,
    synthesis,
)
from csm_tts.watermark.weights import DEFAULT_MESSAGE_SDR, GatedLayer, WatermarkModel

DEFAULT_LOOKAHEAD_FRAMES = 0


class _LayerStream:
    """One gated layer over a growing sequence of frames, with its causal BatchNorm statistics."""

    def __init__(self, layer: GatedLayer, waits: bool, device: torch.device):
        self.layer = layer
        self.waits = waits  # uses the real frame t+1 (computes frame t only once t+1 has arrived)
        self.context = 1 if layer.time_taps > 1 else 0  # frames kept from before the next output frame
        self.inputs: torch.Tensor | None = None  # (1, C, F, k): frames next_out - context .. received - 1
        self.next_out = 0
        self.stats = CausalMean((2, layer.bn_weight.shape[0]), device)

    def window(self, frames: torch.Tensor, final: bool) -> torch.Tensor | None:
        """Take new input frames (1, C, F, n); return the input window (1, C, F, m + taps - 1) of the m output frames
        now complete, or None when there are none. The convolution itself runs in `run_layer`, over many streams."""
        if self.inputs is None:  # zero frame before the first one (the convolution's padding)
            zero = frames.new_zeros(*frames.shape[:-1], self.context)
            self.inputs = torch.cat([zero, frames], dim=-1)
        elif frames.shape[-1]:
            self.inputs = torch.cat([self.inputs, frames], dim=-1)
        x = self.inputs
        if self.waits and final:
            x = torch.cat([x, x.new_zeros(*x.shape[:-1], 1)], dim=-1)  # zero frame after the last one
        n_out = x.shape[-1] - self.layer.time_taps + 1
        if n_out <= 0:
            return None
        self.next_out += n_out
        keep = self.inputs.shape[-1] - n_out
        self.inputs = self.inputs[..., self.inputs.shape[-1] - keep :] if keep > 0 else self.inputs[..., :0]
        return x

    def finish(self, pre: torch.Tensor | None, bins: int) -> torch.Tensor:
        """Pre-activations of the completed frames -> this stream's output frames (1, C', F, m), with its own causal
        BatchNorm statistics."""
        if pre is None:
            return torch.zeros(1, self.layer.bn_weight.shape[0], bins, 0, device=self.layer.weight.device)
        return batch_norm(self.layer, pre, self.stats)


def run_layer(layer: GatedLayer, windows: list[torch.Tensor], pack_frames: int | None = None) -> list[torch.Tensor]:
    """The layer's convolution over the windows of many streams, packed side by side along time (at most
    `pack_frames` frames per call; None: all in one call): a stream's output frames only read its own window, the
    columns that straddle two windows are computed and thrown away."""
    outputs: list[torch.Tensor] = []
    group: list[torch.Tensor] = []
    for i, window in enumerate(windows):
        group.append(window)
        width = sum(w.shape[-1] for w in group)
        following = windows[i + 1].shape[-1] if i + 1 < len(windows) else None
        if following is None or (pack_frames is not None and width + following > pack_frames):
            packed = layer.gated(group[0] if len(group) == 1 else torch.cat(group, dim=-1))
            start = 0
            for w in group:
                outputs.append(packed[..., start : start + w.shape[-1] - layer.time_taps + 1])
                start += w.shape[-1]
            group = []
    return outputs


def _run_layers(
    stacks: list[list[_LayerStream]], xs: list[torch.Tensor], finals: list[bool], pack_frames: int | None
) -> list[torch.Tensor]:
    """Each layer once for every stream (stacks[i]: stream i's layer states, all over the same weights)."""
    for depth in range(len(stacks[0])):
        windows = [stack[depth].window(x, final) for stack, x, final in zip(stacks, xs, finals, strict=True)]
        live = [w for w in windows if w is not None]
        pre = iter(run_layer(stacks[0][depth].layer, live, pack_frames) if live else [])
        xs = [
            stack[depth].finish(next(pre) if w is not None else None, x.shape[2])
            for stack, w, x in zip(stacks, windows, xs, strict=True)
        ]
    return xs


class StreamingWatermarker:
    """Watermarks one stream of 24 kHz audio chunk by chunk; one instance per stream. Instances share only the
    read-only weights, so streams may run on different threads.

    push() returns the watermarked audio completed so far (it may be shorter than what came in: the STFT needs the
    next hop, soxr its filter length); flush() returns the rest. Concatenated, the output has the input's length
    and does not depend on how the input was chunked.
    """

    def __init__(
        self,
        model: WatermarkModel,
        key: Sequence[int],
        lookahead_frames: int = DEFAULT_LOOKAHEAD_FRAMES,
        message_sdr: float = DEFAULT_MESSAGE_SDR,
        sample_rate: int = SAMPLE_RATE,
    ):
        m = self.model = model
        self.message_sdr = float(message_sdr)
        self.sample_rate = int(sample_rate)
        self.lookahead_frames = check_lookahead(model, lookahead_frames)
        self._messages = model.message_frames(key)
        plan = layer_plan(model, self.lookahead_frames)
        self._encoder = [_LayerStream(layer, waits, m.device) for layer, waits in plan[: len(m.encoder)]]
        self._decoder = [_LayerStream(layer, waits, m.device) for layer, waits in plan[len(m.encoder) :]]
        self._bins = m.n_fft // 2 + 1
        resample = self.sample_rate != m.sample_rate
        self._up = (
            soxr.ResampleStream(self.sample_rate, m.sample_rate, 1, dtype="float32", quality=RESAMPLER_QUALITY)
            if resample
            else None
        )
        self._down = (
            soxr.ResampleStream(m.sample_rate, self.sample_rate, 1, dtype="float32", quality=RESAMPLER_QUALITY)
            if resample
            else None
        )
        # Input side (stream rate): samples received and not yet returned, and the watermark waiting for them.
        self._input = np.zeros(0, np.float32)
        self._delta = np.zeros(0, np.float32)
        self._received = 0
        self._returned = 0
        # Analysis (model rate): the signal from absolute sample _x_start on, and its first n_fft/2 + 1 samples
        # (frame 0 reflects them).
        self._x = np.zeros(0, np.float32)
        self._x_start = 0
        self._x_total = 0
        self._head = np.zeros(0, np.float32)
        self._power_sum = 0.0  # sum of squares of model-rate samples [0, _power_n)
        self._power_n = 0
        self._carrier_power = CausalMean((), m.device)
        self._frames = 0  # STFT frames analysed
        # Per analysed frame, until the decoder has produced its message: (n_bins, k) / (k,) tensors.
        self._magnitude = torch.zeros(self._bins, 0, device=m.device)
        self._phasor = torch.zeros(self._bins, 0, dtype=torch.complex64, device=m.device)
        self._carrier_rms = torch.zeros(0, device=m.device)
        self._gain = torch.zeros(0, device=m.device)
        self._decoder_extra = torch.zeros(1, 2, self._bins, 0, device=m.device)  # scaled carrier, message
        # Synthesis (model rate): overlap-add buffer from absolute sample _ola_start on.
        self._ola = torch.zeros(m.n_fft, device=m.device)
        self._ola_start = -(m.n_fft // 2)
        self._synthesised = 0
        self._finished = False

    # ---- public

    def push(self, audio: np.ndarray) -> np.ndarray:
        return watermark_together([(self, audio)])[0]

    def flush(self) -> np.ndarray:
        """The rest of the stream; after it the watermarker is finished (a second flush returns nothing)."""
        return watermark_together([(self, None)])[0]

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def pending_samples(self) -> int:
        """Input samples received but not yet returned: the delay this stage adds right now."""
        return self._received - self._returned

    # ---- the phases of one pass (watermark_together)

    def _take(self, audio: np.ndarray | None) -> torch.Tensor | None:
        """New input (None: the end of the stream), resampled and analysed: the new carrier frames (1, 1, bins, k)
        for the networks, or None when the networks have nothing to run for this stream."""
        if audio is None:
            empty = np.zeros(0, np.float32)
            x = self._up.resample_chunk(empty, last=True) if self._up is not None else empty
        else:
            audio = np.ascontiguousarray(np.asarray(audio, dtype=np.float32).reshape(-1))
            self._input = np.concatenate([self._input, audio])
            self._received += audio.size
            x = self._up.resample_chunk(audio) if self._up is not None else audio
        self._append_signal(x)
        return self._analyse(final=audio is None) if self._x_total else None

    def _decoder_input(self, features: torch.Tensor) -> torch.Tensor:
        """dec_c's input: encoder features with the (scaled) carrier and the message of the same frames."""
        n = features.shape[-1]
        x = torch.cat([features, self._decoder_extra[..., :n]], dim=1)
        self._decoder_extra = self._decoder_extra[..., n:]
        return x

    def _release(self, final: bool) -> np.ndarray:
        """The input samples whose watermark is complete, watermarked."""
        delta = self._complete_samples(final)
        if self._down is not None:
            delta = self._down.resample_chunk(delta, last=final)
        self._delta = np.concatenate([self._delta, delta])
        if final:  # the resampler may end a sample short of (or past) the input length
            ready = self._input.size
            self._delta = np.concatenate([self._delta, np.zeros(max(ready - self._delta.size, 0), np.float32)])
        else:
            ready = min(self._input.size, self._delta.size)
        out = self._input[:ready] + self._delta[:ready]
        self._input = self._input[ready:]
        self._delta = self._delta[ready:] if not final else np.zeros(0, np.float32)
        self._returned += ready
        self._finished = self._finished or final
        return out

    def _append_signal(self, x: np.ndarray) -> None:
        half = self.model.n_fft // 2
        self._x = np.concatenate([self._x, x])
        self._x_total += x.size
        if self._head.size <= half:
            self._head = np.concatenate([self._head, x[: half + 1 - self._head.size]])

    def _analyse(self, final: bool) -> torch.Tensor:
        """STFT of every frame whose window became complete; frame t covers model-rate samples
        [t*hop - n_fft/2, t*hop + n_fft/2) (silentcipher's centred frames)."""
        m = self.model
        half = m.n_fft // 2
        n = self._x_total
        signal, head = self._x, self._head
        if final:
            # silentcipher pads the clip with zeros to a multiple of n_fft, then reflects n_fft/2 at both ends.
            pad = padding(n, m.n_fft)
            padded = np.concatenate([self._x, np.zeros(pad, np.float32)])
            signal = np.concatenate([padded, padded[-half - 1 : -1][::-1]])
            head = np.concatenate([self._head, np.zeros(pad, np.float32)])[: half + 1]
            last = frame_count(n, m)
        else:
            last = 0 if n <= half else (n - half) // m.hop + 1
        if last <= self._frames:
            return torch.zeros(1, 1, self._bins, 0, device=m.device)
        segments, gains = [], []
        for t in range(self._frames, last):
            start = t * m.hop - half
            if start < 0:  # only frame 0, while _x_start is still 0
                segments.append(np.concatenate([head[1 : 1 - start][::-1], signal[: m.n_fft + start]]))
            else:
                segments.append(signal[start - self._x_start : start - self._x_start + m.n_fft])
            # causal: the networks' input gain uses the power of every sample up to the end of the frame's window
            # (encode_wav: the power of the whole clip).
            end = min(t * m.hop + half, n)
            if end > self._power_n:
                chunk = self._x[self._power_n - self._x_start : end - self._x_start].astype(np.float64)
                self._power_sum += float(np.dot(chunk, chunk))
                self._power_n = end
            gains.append(input_gain(self._power_sum / self._power_n))
        first = self._frames
        self._frames = last
        if not final:  # drop the samples no later frame (nor the power sum) needs
            keep_from = max(min(last * m.hop - half, self._power_n), 0)
            if keep_from > self._x_start:
                self._x = self._x[keep_from - self._x_start :]
                self._x_start = keep_from
        magnitude, phasor = spectrum(m, torch.from_numpy(np.stack(segments)).to(m.device))
        gain = torch.tensor(gains, dtype=torch.float32, device=m.device)
        # causal: utterance-level normalisation uses the mean carrier power over every frame so far
        # (encode_wav: over the whole clip). Frame-level normalisation is causal already.
        power = self._carrier_power.update((magnitude.double() ** 2).sum(dim=0), magnitude.shape[0])
        carrier = magnitude * gain  # encode_wav scales the signal before its STFT: same thing
        symbols = torch.arange(first, last, device=m.device) % m.config.message_len  # global frame index
        extra = torch.stack([carrier, self._messages[symbols].T])[None]
        self._magnitude = torch.cat([self._magnitude, magnitude], dim=-1)
        self._phasor = torch.cat([self._phasor, phasor], dim=-1)
        self._carrier_rms = torch.cat([self._carrier_rms, torch.sqrt(power).float()])
        self._gain = torch.cat([self._gain, gain])
        self._decoder_extra = torch.cat([self._decoder_extra, extra], dim=-1)
        return carrier[None, None]

    def _synthesise(self, x: torch.Tensor) -> None:
        """The decoder's output for newly finished frames (1, 1, n_bins, n): overlap-add their watermark."""
        m = self.model
        n = x.shape[-1]
        if n == 0:
            return
        magnitude, phasor = self._magnitude[:, :n], self._phasor[:, :n]
        message = scaled_message(m, x[0, 0], magnitude, self._carrier_rms[:n], self._gain[:n], self.message_sdr)
        frames = synthesis(m, (reshape(m, magnitude, message) - magnitude) * phasor)
        self._magnitude, self._phasor = self._magnitude[:, n:], self._phasor[:, n:]
        self._carrier_rms, self._gain = self._carrier_rms[n:], self._gain[n:]
        # Overlap-add: frame t covers [t*hop - n_fft/2, t*hop + n_fft/2).
        begin = self._synthesised * m.hop - m.n_fft // 2 - self._ola_start
        need = begin + (n - 1) * m.hop + m.n_fft
        if need > self._ola.shape[0]:
            self._ola = torch.cat([self._ola, torch.zeros(need - self._ola.shape[0], device=m.device)])
        for i, frame in enumerate(frames):
            self._ola[begin + i * m.hop : begin + i * m.hop + m.n_fft] += frame
        self._synthesised += n

    def _complete_samples(self, final: bool) -> np.ndarray:
        """Model-rate watermark samples that no later frame changes: those before (frames synthesised - 1) * hop,
        or at the end everything up to the signal's length."""
        m = self.model
        done = self._x_total if final else (self._synthesised - 1) * m.hop
        begin = max(self._ola_start, 0)
        if done <= begin:
            return np.zeros(0, np.float32)
        lo, hi = begin - self._ola_start, done - self._ola_start
        positions = torch.arange(begin, done, device=m.device) % m.hop
        samples = self._ola[lo:hi] / envelope(m)[positions]
        self._ola = self._ola[hi:]
        self._ola_start = done
        return samples.cpu().numpy().astype(np.float32)


def watermark_together(
    items: Sequence[tuple[StreamingWatermarker, np.ndarray | None]], pack_frames: int | None = None
) -> list[np.ndarray]:
    """One pass over many streams: each (watermarker, audio) pushes audio, or flushes when audio is None. The networks
    run once per layer over the new frames of every stream (`run_layer`); everything else (resampling, STFT, causal
    statistics, message phase, overlap-add) stays per stream. Each stream's output equals its own push()/flush() up
    to float rounding (the packed convolution may sum in another order; tests/test_watermark_batching.py bounds it).
    """
    if len({id(w) for w, _ in items}) != len(items):
        raise ValueError("a stream appears twice in one pass")
    for w, audio in items:
        if w.finished and audio is not None:
            raise RuntimeError("push() after flush(): this stream has ended")
    live = [(i, w, audio is None) for i, (w, audio) in enumerate(items) if not (w.finished and audio is None)]
    outputs = [np.zeros(0, np.float32)] * len(items)
    with torch.inference_mode():
        carriers = [(i, w, final, w._take(items[i][1])) for i, w, final in live]
        groups: dict[tuple[int, int], list[tuple[StreamingWatermarker, bool, torch.Tensor]]] = {}
        for _, w, final, carrier in carriers:
            if carrier is not None:  # the same weights and layer plan share one convolution per layer
                groups.setdefault((id(w.model), w.lookahead_frames), []).append((w, final, carrier))
        for group in groups.values():
            marks, finals, xs = (list(column) for column in zip(*group, strict=True))
            features = _run_layers([w._encoder for w in marks], xs, finals, pack_frames)
            decoded = _run_layers(
                [w._decoder for w in marks],
                [w._decoder_input(f) for w, f in zip(marks, features, strict=True)],
                finals,
                pack_frames,
            )
            for w, x in zip(marks, decoded, strict=True):
                w._synthesise(x)
        for i, w, final in live:
            outputs[i] = w._release(final)
    return outputs
