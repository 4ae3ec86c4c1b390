"""Triton adapter for the streaming silentcipher watermark (decoupled: one final response per chunk, sent by a batching
thread). Logic: csm_tts.watermark (streams, batching)."""

import json
import threading
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from csm_tts import SAMPLE_RATE
from csm_tts.triton.cancellation import report_progress, stop_stream
from csm_tts.triton.config import ConfigError, config_parameter, float_parameter, int_parameter
from csm_tts.triton.errors import coded, error_response
from csm_tts.triton.memory import return_free_memory
from csm_tts.triton.metrics import WatermarkMetrics, instance_labels
from csm_tts.triton.request_id import loggable_request_id
from csm_tts.triton.watchdog import watch_server
from csm_tts.watermark.batching import ChunkQueue, QueuedChunk
from csm_tts.watermark.options import InvalidWatermarkOption, WatermarkSettings, resolve
from csm_tts.watermark.streams import Chunk, StreamError, StreamGone, TooManyStreams, WatermarkStreams
from csm_tts.watermark.weights import load_watermark_model

PREFIX = "[watermarker]"
# On a CPU each stream keeps its own convolution call: packing streams together was no faster there (docs/benchmarks.md,
# issue 20) and changes the float summation order, while separate calls keep every stream bit-exact to its solo run.
CPU_PACK_FRAMES = 1


def scalar(request, name):
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0]


class Arrival:
    """A request as execute() read it: its chunk (or why it cannot be one) and where its one response goes."""

    def __init__(self, request):
        self.request = request
        self.sender = request.get_response_sender()
        self.request_id = loggable_request_id(request)
        self.chunk: Chunk | None = None
        self.error: tuple[str, str] | None = None  # (message, code) for a chunk that cannot be applied

    def answer(self, response):
        try:
            self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # the request is gone (its client left): nothing to tell
            pb_utils.Logger.log_verbose(f"{PREFIX} request {self.request_id}: response not sent: {e}")


class TritonPythonModel:
    def initialize(self, args):
        watch_server(PREFIX)  # exit with the server, removing its shared memory (csm_tts/triton/watchdog.py)
        self.model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException(
                f"{PREFIX} must be decoupled (model_transaction_policy): a batching thread answers the chunks"
            )
        try:
            self.settings = WatermarkSettings.from_env()
        except ValueError as e:
            raise pb_utils.TritonModelException(f"{PREFIX} {e}") from None
        model_dir = config_parameter(self.model_config, "model_dir", env="CSM_WATERMARK_MODEL_DIR")
        if model_dir is None:
            raise pb_utils.TritonModelException(
                f"{PREFIX} no weights: set the model_dir parameter or CSM_WATERMARK_MODEL_DIR"
            )
        gpu = args["model_instance_kind"] == "GPU"
        try:
            lookahead = int_parameter(self.model_config, "lookahead_frames", 0, 0, 6)
            message_sdr = float_parameter(self.model_config, "message_sdr", 36.0, 0.0, 100.0)
            idle_timeout = float_parameter(
                self.model_config, "idle_timeout_s", 30.0, 0.1, 86_400.0, env="CSM_WATERMARK_IDLE_TIMEOUT_S"
            )
            max_streams = int_parameter(self.model_config, "max_streams", 256, 1, 100_000)
            threads = int_parameter(self.model_config, "cpu_threads", 0, 0, 1024)
            min_chunk_ms = int_parameter(self.model_config, "min_chunk_ms", 100, 0, 10_000)
            per_pass = int_parameter(self.model_config, "max_streams_per_pass", 64, 1, 100_000)
            pack = int_parameter(self.model_config, "pack_frames", 0 if gpu else CPU_PACK_FRAMES, 0, 100_000)
        except ConfigError as e:
            raise pb_utils.TritonModelException(f"{PREFIX} invalid config: {e}") from None
        if gpu:
            device = f"cuda:{args['model_instance_device_id']}"
        else:
            device = "cpu"
            if threads:
                torch.set_num_threads(threads)
        try:
            model = load_watermark_model(model_dir, device=device)
            self.streams = WatermarkStreams(
                model,
                lookahead_frames=lookahead,
                message_sdr=message_sdr,
                idle_timeout_s=idle_timeout,
                max_streams=max_streams,
                min_chunk_samples=min_chunk_ms * SAMPLE_RATE // 1000,
                pack_frames=pack or None,
            )
        except (FileNotFoundError, ValueError) as e:
            raise pb_utils.TritonModelException(f"{PREFIX} {e}") from None
        self._warm_up()
        self.metrics = WatermarkMetrics(pb_utils, instance_labels(args, "watermarker"))
        self.queue = ChunkQueue(lambda arrival: arrival.request.is_cancelled(), max_streams_per_pass=per_pass)
        if self.settings.key_is_public:
            pb_utils.Logger.log_warn(
                f"{PREFIX} CSM_WATERMARK_KEY is not set: watermarking with Sesame's PUBLIC key (not secret; anyone "
                "can verify it). Set CSM_WATERMARK_KEY to 5 private integers 0-255 for a private mark."
            )
        pb_utils.Logger.log_info(
            f"{PREFIX} loaded {model.model_dir} on {device}; default {'on' if self.settings.enabled else 'off'}, "
            f"key id {'public' if self.settings.key_is_public else 'private'}; lookahead {lookahead} frames, "
            f"message_sdr {message_sdr}, idle timeout {idle_timeout:g} s; messages of at least {min_chunk_ms} ms; "
            f"up to {per_pass} streams per pass, {pack or 'all'} frames per convolution"
        )
        self._stop = threading.Event()
        self._evictor = threading.Thread(target=self._evict_loop, name="watermark-evictor", daemon=True)
        self._evictor.start()
        self._batcher = threading.Thread(target=self._batch_loop, name="watermark-batcher", daemon=True)
        self._batcher.start()

    def _warm_up(self):
        """One short stream, so the first real chunk does not pay for one-time kernel set-up."""
        noise = (np.random.default_rng(0).standard_normal(4800) * 0.01).astype(np.float32)
        self.streams.process("warm-up", (0, 0, 0, 0, 0), "none", noise, 0, 0, True)

    def _evict_loop(self):
        interval = min(1.0, self.streams.idle_timeout_s / 4)
        while not self._stop.wait(interval):
            for gone in self.streams.evict_idle():
                pb_utils.Logger.log_info(
                    f"{PREFIX} evicted stream {gone.stream_id} after {gone.chunks} chunks (idle {gone.idle_s:.1f} s)"
                )

    # -- execute: read and queue ---------------------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            arrival = Arrival(request)
            stream_id, samples, progress, is_last = "", 0, 0, False
            try:
                stream_id = scalar(request, "stream_id")
                stream_id = stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
                audio = pb_utils.get_input_tensor_by_name(request, "audio").as_numpy()
                index, offset = int(scalar(request, "chunk_index")), int(scalar(request, "sample_offset"))
                is_last = bool(scalar(request, "is_last"))
                samples, progress = audio.size, offset + audio.size
                raw = request.parameters()
                choice = resolve(json.loads(raw) if raw else {}, self.settings)
                arrival.chunk = Chunk(stream_id, choice.key, choice.key_id, audio, index, offset, is_last)
            except (InvalidWatermarkOption, json.JSONDecodeError, UnicodeDecodeError) as e:
                arrival.error = (str(e), "INVALID_ARG")
            except Exception as e:  # answered in order by the batching thread, never raised out of execute
                arrival.error = (f"unreadable chunk: {type(e).__name__}: {e}", "INTERNAL")
            try:
                self.queue.put(QueuedChunk(stream_id, samples, progress, is_last, arrival))
            except RuntimeError as e:  # shutting down
                arrival.answer(error_response(pb_utils, str(e), "UNAVAILABLE"))
        self._show_queue()
        return None

    def _show_queue(self):
        chunks, samples = self.queue.depth
        self.metrics.queue_depth(chunks, samples / SAMPLE_RATE)

    # -- the batching thread -------------------------------------------------------------------------------------------
    def _batch_loop(self):
        worked = False
        while True:
            step = self.queue.next_pass(timeout=0.5)
            if step is None:
                if self._stop.is_set():
                    return
                if worked:  # idle for 0.5 s after work: what a burst freed goes back to the system
                    return_free_memory()
                    worked = False
                continue
            worked = True
            try:
                self._run_pass(step)
            except Exception as e:  # never let the thread die: every chunk of the pass has been answered below
                pb_utils.Logger.log_error(f"{PREFIX} pass failed: {type(e).__name__}: {e}")

    def _run_pass(self, step):
        started = time.perf_counter()
        for stream_id in step.cancelled:
            # Stop csm_1b, drop the state, and answer without an error: an error would leave the tts request in
            # flight forever in Triton 2.51's ensemble (csm_tts/triton/cancellation.py). Nobody reads it.
            stop_stream(stream_id)
            self.streams.drop(stream_id)
            dropped = sum(1 for c in step.dropped if c.stream_id == stream_id)
            pb_utils.Logger.log_info(
                f"{PREFIX} cancelled stream {stream_id}: dropped its watermark state and {dropped} queued chunks"
            )
        for queued in step.dropped:
            self._answer(queued, self._nothing(queued.is_last))
        ready = [q for q in step.batch if q.request.error is None]
        for queued in step.batch:
            if queued.request.error is not None:
                self._answer(queued, self._failed(queued.stream_id, *queued.request.error))
        try:
            results = self.streams.process_batch([q.request.chunk for q in ready])
        except Exception as e:  # the pass itself failed: every stream in it fails
            pb_utils.Logger.log_error(f"{PREFIX} watermark pass failed: {type(e).__name__}: {e}")
            results = [e] * len(ready)
        for queued, result in zip(ready, results, strict=True):
            self._answer(queued, self._response(queued, result))
        self.metrics.watermark_pass(time.perf_counter() - started, len(self.streams))
        self._show_queue()

    def _answer(self, queued, response):
        """Answer a chunk taken off the queue, and tell csm_1b how far its stream has got here."""
        self.metrics.chunk(time.monotonic() - queued.arrived)
        report_progress(queued.stream_id, queued.progress)
        queued.request.answer(response)

    def _response(self, queued, result):
        stream_id = queued.stream_id
        if isinstance(result, (StreamError, TooManyStreams, StreamGone)):
            if isinstance(result, StreamError):  # out of order or unknown: the ensemble's fault, never the client's
                pb_utils.Logger.log_error(f"{PREFIX} request {queued.request.request_id}: {result}")
                return self._failed(stream_id, str(result), "INTERNAL")
            return self._failed(stream_id, str(result), "UNAVAILABLE")
        if isinstance(result, Exception):
            pb_utils.Logger.log_error(
                f"{PREFIX} request {queued.request.request_id}: chunk failed: {type(result).__name__}: {result}"
            )
            return self._failed(stream_id, f"watermarking failed: {result}", "INTERNAL")
        if result.is_last:
            pb_utils.Logger.log_info(
                f"{PREFIX} request {queued.request.request_id}: stream {stream_id} finished "
                f"({result.chunk_index + 1} chunks, key id {result.key_id})"
            )
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("audio", result.audio.astype(np.float32)),
                pb_utils.Tensor("chunk_index", np.array([result.chunk_index], dtype=np.int32)),
                pb_utils.Tensor("is_last", np.array([result.is_last], dtype=bool)),
                pb_utils.Tensor("watermarked", np.array([result.watermarked], dtype=bool)),
                pb_utils.Tensor("watermark_key_id", np.array([result.key_id.encode()], dtype=np.object_)),
            ]
        )

    def _failed(self, stream_id, message, code):
        """A chunk that fails fails its tts request. While csm_1b still generates the stream, the error goes to csm_1b,
        which stops and sends it as the stream's last response (answering it here would leave the tts request in
        flight forever: csm_tts/triton/cancellation.py); otherwise (csm_1b has ended, or a direct client) it is
        answered here. Either way the stream's state and its queued chunks are dropped."""
        held = bool(stream_id) and stream_id in self.streams
        if held:
            self.streams.drop(stream_id, why=f"stopped after an error ({message})")
        running = bool(stream_id) and stop_stream(stream_id, coded(code, message))
        if held or running:
            self.queue.stop(stream_id)
        if running:
            pb_utils.Logger.log_info(f"{PREFIX} stream {stream_id} failed ({code}): csm_1b ends it with the error")
            return self._nothing(False)
        return error_response(pb_utils, message, code)

    @staticmethod
    def _nothing(is_last):
        """A response without audio, for a chunk whose stream is over (the client sees nothing of it)."""
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("audio", np.zeros(0, np.float32)),
                pb_utils.Tensor("chunk_index", np.array([0], dtype=np.int32)),
                pb_utils.Tensor("is_last", np.array([is_last], dtype=bool)),
                pb_utils.Tensor("watermarked", np.array([False], dtype=bool)),
                pb_utils.Tensor("watermark_key_id", np.array([b"none"], dtype=np.object_)),
            ]
        )

    def finalize(self):
        self._stop.set()
        left = self.queue.close()
        self._batcher.join(timeout=30)
        for queued in left:  # every request gets its one final response, even at unload
            self._answer(queued, self._nothing(queued.is_last))
        self._evictor.join(timeout=5)
        self.metrics.close()
        pb_utils.Logger.log_info(
            f"{PREFIX} finalized; {len(self.streams)} streams dropped, {len(left)} queued chunks answered without audio"
        )
