"""Triton adapter for the CSM-1B streaming engine (decoupled). Logic: csm_tts.speech (engine, scheduler)."""

import json
import time
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from csm_tts.speech.chunk_schedule import ChunkSchedule
from csm_tts.speech.engine import CsmEngine, InvalidRequest
from csm_tts.speech.request_parsing import CONTEXT_INPUTS, parse_parameters, parse_request
from csm_tts.speech.scheduler import ServerFull, StreamScheduler
from csm_tts.triton.cancellation import take_cancel
from csm_tts.triton.config import config_parameter
from csm_tts.triton.errors import error_response
from csm_tts.triton.metrics import CsmMetrics, instance_labels
from csm_tts.triton.request_id import loggable_request_id
from csm_tts.watermark.options import InvalidWatermarkOption, WatermarkSettings, resolve

PREFIX = "[csm_1b]"


class TritonSink:
    """Sends one stream's chunks through its response sender; the last response carries the final flag."""

    def __init__(self, sender, metrics=None):
        self.sender = sender
        self.stream_id = uuid.uuid4().hex
        self.metrics = metrics
        self.submitted = time.perf_counter()

    def send_chunk(self, stream, chunk):
        tensors = [
            pb_utils.Tensor("audio", chunk.audio.astype(np.float32)),
            pb_utils.Tensor("stream_id", np.array([stream.stream_id.encode()], dtype=np.object_)),
            pb_utils.Tensor("chunk_index", np.array([chunk.index], dtype=np.int32)),
            pb_utils.Tensor("is_last", np.array([chunk.is_last], dtype=bool)),
            pb_utils.Tensor("sample_offset", np.array([chunk.sample_offset], dtype=np.int64)),
        ]
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if chunk.is_last else 0
        if chunk.index == 0 and self.metrics is not None:
            self.metrics.first_chunk_sent(time.perf_counter() - self.submitted)
        if chunk.is_last:
            take_cancel(self.stream_id)  # a marker that came too late must not linger
        self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=flags)

    def send_error(self, message, code_name):
        send_error(self.sender, message, code_name)

    def is_cancelled(self):
        # Direct clients cancel this request; clients of the tts ensemble cancel through the watermarker.
        return self.sender.is_cancelled() or take_cancel(self.stream_id)


def send_error(sender, message, code):
    """The error response, then the final flag: every request ends with exactly one final response."""
    sender.send(error_response(pb_utils, message, code), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException(f"{PREFIX} must be decoupled: set model_transaction_policy.decoupled")
        device = f"cuda:{args['model_instance_device_id']}" if args["model_instance_kind"] == "GPU" else "cpu"
        model_dir = config_parameter(self.model_config, "model_dir", env="CSM_MODEL_DIR")
        if model_dir is None:
            raise pb_utils.TritonModelException(f"{PREFIX} no checkpoint: set the model_dir parameter or CSM_MODEL_DIR")

        def number(key, default, kind=int):
            return kind(config_parameter(self.model_config, key, default=str(default)))

        schedule = ChunkSchedule(
            first_frames=number("first_chunk_frames", 2),
            growth=number("chunk_growth", 2.0, float),
            max_frames=number("max_chunk_frames", 10),
        )
        # Invalid watermark settings must stop the model from loading (the watermarker checks them too).
        self.watermark_settings = WatermarkSettings.from_env()
        max_active = number("max_active_streams", 8)
        self.engine = CsmEngine.from_dir(model_dir, device=device, schedule=schedule, max_streams=max_active)
        log = lambda msg: pb_utils.Logger.log_info(f"{PREFIX} {msg}")  # noqa: E731
        log(f"loaded {model_dir} on {device}; chunk schedule {schedule}; {self.engine.slot_summary}")
        if self.engine.cuda_graphs:
            started = time.perf_counter()
            graphs = self.engine.capture_graphs()
            log(f"captured {graphs} CUDA graphs of the frame step in {time.perf_counter() - started:.1f} s")
        self.metrics = CsmMetrics(pb_utils, instance_labels(args, "csm_1b"))
        self.scheduler = StreamScheduler(
            self.engine,
            max_active=max_active,
            max_queued=number("max_queued_streams", 32),
            logger=log,
            observer=self.metrics,
            max_queue_wait_s=number("max_queue_wait_ms", 5000) / 1000,
        )

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                parameters = parse_parameters(request.parameters())
                resolve(parameters, self.watermark_settings)  # fail fast on bad watermark options
                text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)[0]
                context = {}
                for name in CONTEXT_INPUTS:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    context[name] = None if tensor is None else tensor.as_numpy()
                generation = parse_request(text, parameters, context)
                self.engine.validate(generation)
                sink = TritonSink(sender, self.metrics)
                self.scheduler.submit(generation, sink, stream_id=sink.stream_id)
                # The request id (the proxy's X-Request-ID) ties this stream's log lines to the client's request.
                pb_utils.Logger.log_info(
                    f"{PREFIX} request {loggable_request_id(request)}: stream {sink.stream_id} queued "
                    f"({len(generation.text)} characters, up to {generation.max_audio_length_ms} ms)"
                )
            except (InvalidRequest, InvalidWatermarkOption) as e:
                send_error(sender, str(e), "INVALID_ARG")
            except ServerFull as e:
                send_error(sender, str(e), "UNAVAILABLE")
            except Exception as e:  # never raise out of execute once a sender is in use
                pb_utils.Logger.log_error(f"{PREFIX} request failed: {e}")
                send_error(sender, f"request failed: {e}", "INTERNAL")
        return None

    def finalize(self):
        pb_utils.Logger.log_info(f"{PREFIX} finalizing: waiting for streams in flight")
        self.scheduler.close()
        self.metrics.close()
