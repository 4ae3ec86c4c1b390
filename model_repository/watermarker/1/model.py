"""Triton adapter for the streaming silentcipher watermark (one response per chunk). Logic: csm_tts.watermark."""

import json
import threading

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from csm_tts.triton.cancellation import stop_stream
from csm_tts.triton.config import ConfigError, config_parameter, float_parameter, int_parameter
from csm_tts.triton.errors import error_response
from csm_tts.watermark.options import InvalidWatermarkOption, WatermarkSettings, resolve
from csm_tts.watermark.streams import StreamError, StreamGone, TooManyStreams, WatermarkStreams
from csm_tts.watermark.weights import load_watermark_model

PREFIX = "[watermarker]"


def scalar(request, name):
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args):
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
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        stream_id = None
        try:
            stream_id = scalar(request, "stream_id")
            stream_id = stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
            if request.is_cancelled():
                stop_stream(stream_id)  # so that csm_1b stops generating (csm_tts/triton/cancellation.py)
                if self.streams.drop(stream_id):
                    pb_utils.Logger.log_info(f"{PREFIX} cancelled stream {stream_id}: dropped its watermark state")
                return error_response(pb_utils, "the request was cancelled", "CANCELLED")
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
        except (InvalidWatermarkOption, StreamError, json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._failed(stream_id, str(e), "INVALID_ARG")
        except (TooManyStreams, StreamGone) as e:
            return self._failed(stream_id, str(e), "UNAVAILABLE")
        except Exception as e:  # report, never raise out of execute
            pb_utils.Logger.log_error(f"{PREFIX} chunk failed: {type(e).__name__}: {e}")
            return self._failed(stream_id, f"watermarking failed: {e}", "INTERNAL")
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
        """A failed chunk fails its tts request, and Triton then forwards nothing more of the stream: stop csm_1b's
        generation too (no one will get its audio), and drop the stream's state."""
        if stream_id is not None:
            if stop_stream(stream_id):
                pb_utils.Logger.log_info(f"{PREFIX} stream {stream_id} failed ({code}): stopped its generation")
            if stream_id in self.streams:
                self.streams.drop(stream_id, why=f"stopped after an error ({message})")
        return error_response(pb_utils, message, code)

    def finalize(self):
        self._stop.set()
        self._evictor.join(timeout=5)
        pb_utils.Logger.log_info(f"{PREFIX} finalized; {len(self.streams)} streams dropped")
