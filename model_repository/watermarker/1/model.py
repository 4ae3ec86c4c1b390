"""Triton adapter for the streaming silentcipher watermark (one response per chunk). Logic: csm_tts.watermark."""

import json
import threading
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from csm_tts.triton.cancellation import stop_stream
from csm_tts.triton.config import ConfigError, config_parameter, float_parameter, int_parameter
from csm_tts.triton.errors import coded, error_response
from csm_tts.triton.metrics import WatermarkMetrics, instance_labels
from csm_tts.triton.request_id import loggable_request_id
from csm_tts.triton.watchdog import watch_server
from csm_tts.watermark.options import InvalidWatermarkOption, WatermarkSettings, resolve
from csm_tts.watermark.streams import StreamError, StreamGone, TooManyStreams, WatermarkStreams
from csm_tts.watermark.weights import load_watermark_model

PREFIX = "[watermarker]"


def scalar(request, name):
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args):
        watch_server(PREFIX)  # exit with the server, removing its shared memory (csm_tts/triton/watchdog.py)
        self.model_config = json.loads(args["model_config"])
        if pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException(f"{PREFIX} must not be decoupled: one response per chunk")
        try:
            self.settings = WatermarkSettings.from_env()
        except ValueError as e:
            raise pb_utils.TritonModelException(f"{PREFIX} {e}") from None
        model_dir = config_parameter(self.model_config, "model_dir", env="CSM_WATERMARK_MODEL_DIR")
        if model_dir is None:
            raise pb_utils.TritonModelException(
                f"{PREFIX} no weights: set the model_dir parameter or CSM_WATERMARK_MODEL_DIR"
            )
        try:
            lookahead = int_parameter(self.model_config, "lookahead_frames", 0, 0, 6)
            message_sdr = float_parameter(self.model_config, "message_sdr", 36.0, 0.0, 100.0)
            idle_timeout = float_parameter(
                self.model_config, "idle_timeout_s", 30.0, 0.1, 86_400.0, env="CSM_WATERMARK_IDLE_TIMEOUT_S"
            )
            max_streams = int_parameter(self.model_config, "max_streams", 256, 1, 100_000)
            threads = int_parameter(self.model_config, "cpu_threads", 0, 0, 1024)
        except ConfigError as e:
            raise pb_utils.TritonModelException(f"{PREFIX} invalid config: {e}") from None
        if args["model_instance_kind"] == "GPU":
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
            )
        except (FileNotFoundError, ValueError) as e:
            raise pb_utils.TritonModelException(f"{PREFIX} {e}") from None
        self._warm_up()
        self.metrics = WatermarkMetrics(pb_utils, instance_labels(args, "watermarker"))
        if self.settings.key_is_public:
            pb_utils.Logger.log_warn(
                f"{PREFIX} CSM_WATERMARK_KEY is not set: watermarking with Sesame's PUBLIC key (not secret; anyone "
                "can verify it). Set CSM_WATERMARK_KEY to 5 private integers 0-255 for a private mark."
            )
        pb_utils.Logger.log_info(
            f"{PREFIX} loaded {model.model_dir} on {device}; default {'on' if self.settings.enabled else 'off'}, "
            f"key id {'public' if self.settings.key_is_public else 'private'}; lookahead {lookahead} frames, "
            f"message_sdr {message_sdr}, idle timeout {idle_timeout:g} s"
        )
        self._stop = threading.Event()
        self._evictor = threading.Thread(target=self._evict_loop, name="watermark-evictor", daemon=True)
        self._evictor.start()

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

    def execute(self, requests):
        responses = []
        for request in requests:
            started = time.perf_counter()
            responses.append(self._respond(request))
            self.metrics.chunk(time.perf_counter() - started, len(self.streams))
        return responses

    def _respond(self, request):
        stream_id = None
        try:
            stream_id = scalar(request, "stream_id")
            stream_id = stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
            if request.is_cancelled():
                # Stop csm_1b, drop the state, and answer without an error: an error would leave the tts request in
                # flight forever in Triton 2.51's ensemble (csm_tts/triton/cancellation.py). Nobody reads it.
                stop_stream(stream_id)
                if self.streams.drop(stream_id):
                    pb_utils.Logger.log_info(f"{PREFIX} cancelled stream {stream_id}: dropped its watermark state")
                return self._nothing(bool(scalar(request, "is_last")))
            raw = request.parameters()
            parameters = json.loads(raw) if raw else {}
            choice = resolve(parameters, self.settings)
            result = self.streams.process(
                stream_id,
                choice.key,
                choice.key_id,
                pb_utils.get_input_tensor_by_name(request, "audio").as_numpy(),
                int(scalar(request, "chunk_index")),
                int(scalar(request, "sample_offset")),
                bool(scalar(request, "is_last")),
            )
        except (InvalidWatermarkOption, json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._failed(stream_id, str(e), "INVALID_ARG")
        except StreamError as e:  # chunks out of order or unknown: the ensemble's fault, never the client's
            pb_utils.Logger.log_error(f"{PREFIX} request {loggable_request_id(request)}: {e}")
            return self._failed(stream_id, str(e), "INTERNAL")
        except (TooManyStreams, StreamGone) as e:
            return self._failed(stream_id, str(e), "UNAVAILABLE")
        except Exception as e:  # report, never raise out of execute
            pb_utils.Logger.log_error(
                f"{PREFIX} request {loggable_request_id(request)}: chunk failed: {type(e).__name__}: {e}"
            )
            return self._failed(stream_id, f"watermarking failed: {e}", "INTERNAL")
        if result.is_last:
            pb_utils.Logger.log_info(
                f"{PREFIX} request {loggable_request_id(request)}: stream {stream_id} finished "
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
        answered here. Either way the stream's state is dropped."""
        if stream_id is not None and stream_id in self.streams:
            self.streams.drop(stream_id, why=f"stopped after an error ({message})")
        if stream_id is not None and stop_stream(stream_id, coded(code, message)):
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
        self._evictor.join(timeout=5)
        self.metrics.close()
        pb_utils.Logger.log_info(f"{PREFIX} finalized; {len(self.streams)} streams dropped")
