"""Triton adapter for the CSM-1B streaming engine (decoupled). Logic: csm_tts.speech (engine, scheduler)."""

import json
import os
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from csm_tts import limits
from csm_tts.speech.chunk_schedule import ChunkSchedule
from csm_tts.speech.engine import CsmEngine
from csm_tts.speech.flow_control import FlowControl
from csm_tts.speech.graphs import MODES, GraphCaptureFailed
from csm_tts.speech.request import InvalidRequest, Limits
from csm_tts.speech.request_parsing import CONTEXT_INPUTS, parse_parameters, parse_request
from csm_tts.speech.scheduler import EngineBroken, ServerFull, StreamScheduler
from csm_tts.triton import cancellation
from csm_tts.triton.config import ConfigError, bool_parameter, config_parameter, float_parameter, int_parameter
from csm_tts.triton.errors import error_response, split_code
from csm_tts.triton.metrics import CsmMetrics, instance_labels
from csm_tts.triton.request_id import loggable_request_id
from csm_tts.triton.watchdog import watch_server
from csm_tts.watermark.options import InvalidWatermarkOption, WatermarkSettings, resolve

PREFIX = "[csm_1b]"


class TritonSink:
    """Sends one stream's chunks through its response sender; the last response carries the final flag. Owns the
    stream's cancellation marker (csm_tts/triton/cancellation.py) from acceptance to its final response."""

    def __init__(self, sender, metrics=None):
        self.sender = sender
        self.stream_id = uuid.uuid4().hex
        self.metrics = metrics
        self.submitted = time.perf_counter()
        self.marked = cancellation.open_marker(self.stream_id)
        self.stopped: str | None = None  # why the watermarker stopped the stream ("" : its tts client cancelled)
        self.next_index = self.samples = 0

    def _response(self, audio, index, is_last, sample_offset):
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("audio", audio.astype(np.float32)),
                pb_utils.Tensor("stream_id", np.array([self.stream_id.encode()], dtype=np.object_)),
                pb_utils.Tensor("chunk_index", np.array([index], dtype=np.int32)),
                pb_utils.Tensor("is_last", np.array([is_last], dtype=bool)),
                pb_utils.Tensor("sample_offset", np.array([sample_offset], dtype=np.int64)),
            ]
        )

    def send_chunk(self, stream, chunk):
        if chunk.index == 0 and self.metrics is not None:
            self.metrics.first_chunk_sent(time.perf_counter() - self.submitted)
        if not chunk.is_last:
            self.sender.send(self._response(chunk.audio, chunk.index, False, chunk.sample_offset), flags=0)
            self.next_index, self.samples = chunk.index + 1, chunk.sample_offset + chunk.audio.size
            return
        stopped = cancellation.stop_reason(self.stream_id) if self.marked else None
        self.close()  # the stream ends here, whether the send below succeeds or not
        if stopped:  # the watermarker failed a chunk while this one was made: its error is the last word
            send_stop_error(self.sender, stopped)
            return
        response = self._response(chunk.audio, chunk.index, True, chunk.sample_offset)
        self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def send_error(self, message, code_name):
        self.close()  # the stream ends here, whether the send below succeeds or not
        if code_name == "CANCELLED" and self.stopped == "":
            # A tts client hung up. An error here would reach the ensemble after the watermarker's answer and leave
            # the tts request in flight forever (cancellation.py); an empty last chunk ends it cleanly.
            response = self._response(np.zeros(0, np.float32), self.next_index, True, self.samples)
            self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        elif code_name == "CANCELLED" and self.stopped:  # the watermarker failed this stream: its error
            send_stop_error(self.sender, self.stopped)
        else:
            send_error(self.sender, message, code_name)

    def close(self):
        cancellation.close_marker(self.stream_id)

    def samples_done(self):
        """How much of this stream's audio the watermarker has taken, for flow control; None (never held back) for
        a direct csm_1b client, whose stream no watermarker reports on."""
        return cancellation.samples_done(self.stream_id, before_first_report=None) if self.marked else None

    def is_cancelled(self):
        # Direct clients cancel this request; tts streams are stopped by the watermarker (cancellation.py).
        if self.sender.is_cancelled():
            return True
        if self.marked:
            self.stopped = cancellation.stop_reason(self.stream_id)
        return self.stopped is not None


def send_error(sender, message, code):
    """The error response, then the final flag: every request ends with exactly one final response."""
    sender.send(error_response(pb_utils, message, code), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def send_stop_error(sender, stopped):
    """The error the watermarker stopped the stream with ("CODE: message")."""
    code, message = split_code(stopped)
    send_error(sender, message, code or "INTERNAL")


def process_name(pid):
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def read_config(model_config):
    """Every parameter, typed and range-checked (ConfigError names the parameter and its range)."""

    def integer(key, default, low, high=None):
        return int_parameter(model_config, key, default, low, high)

    # 3 frames: the watermarker's first message is then >= 100 ms after its hold-back (docs/benchmarks.md).
    first = integer("first_chunk_frames", 3, 1, 1125)
    growth = float_parameter(model_config, "chunk_growth", 2.0, 1.0, 16.0)
    largest = integer("max_chunk_frames", 10, 1, 1125)
    if largest < first:
        raise ConfigError(f"parameter 'max_chunk_frames' ({largest}) must be >= first_chunk_frames ({first})")
    flow = FlowControl(
        max_unwatermarked_s=integer("max_unwatermarked_ms", 1600, 0, 3_600_000) / 1000 or None,  # 0: never hold
        behind_queue_wait_s=integer("behind_queue_wait_ms", 500, 0, 3_600_000) / 1000,
    )
    graphs = config_parameter(model_config, "cuda_graphs", default="auto").lower()
    if graphs not in MODES:
        raise ConfigError(f"parameter 'cuda_graphs' must be one of {', '.join(MODES)}, got {graphs!r}")
    return {
        "model_dir": config_parameter(model_config, "model_dir", env="CSM_MODEL_DIR"),
        "schedule": ChunkSchedule(first_frames=first, growth=growth, max_frames=largest),
        "limits": Limits(
            max_audio_length_ms=integer(  # 2048 frames at most
                "max_audio_length_ms", limits.MAX_AUDIO_LENGTH_MS, limits.ENGINE_MIN_AUDIO_LENGTH_MS, 163_840
            ),
            max_context_audio_s=float_parameter(
                model_config, "max_context_audio_s", limits.MAX_CONTEXT_AUDIO_S, 0.0, 163.84
            ),
            max_context_segments=integer("max_context_segments", limits.MAX_CONTEXT_SEGMENTS, 0, 1024),
        ),
        "max_active": integer("max_active_streams", 8, 1, 1024),
        "max_queued": integer("max_queued_streams", 32, 1, 100_000),
        "max_queue_wait_s": integer("max_queue_wait_ms", 5000, 1, 3_600_000) / 1000,
        "flow": flow,
        "cuda_graphs": graphs,
        "cpu_threads": integer("cpu_threads", 0, 0, 1024),
        "exit_on_engine_failure": bool_parameter(model_config, "exit_on_engine_failure", True),
    }


class TritonPythonModel:
    def initialize(self, args):
        watch_server(PREFIX)  # exit with the server, removing its shared memory (csm_tts/triton/watchdog.py)
        self.model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException(f"{PREFIX} must be decoupled: set model_transaction_policy.decoupled")
        try:
            config = read_config(self.model_config)
        except ConfigError as e:
            raise pb_utils.TritonModelException(f"{PREFIX} invalid config: {e}") from None
        if config["model_dir"] is None:
            raise pb_utils.TritonModelException(f"{PREFIX} no checkpoint: set the model_dir parameter or CSM_MODEL_DIR")
        if args["model_instance_kind"] == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        else:
            device = "cpu"
            if config["cpu_threads"]:  # one thread per instance: steadier on a shared CPU (docs/benchmarks.md)
                torch.set_num_threads(config["cpu_threads"])
        self.exit_on_engine_failure = config["exit_on_engine_failure"]
        # Invalid watermark settings must stop the model from loading (the watermarker checks them too).
        self.watermark_settings = WatermarkSettings.from_env()
        for stale in cancellation.remove_stale_dirs():
            pb_utils.Logger.log_info(f"{PREFIX} removed {stale}, left by a server that no longer runs")
        self.engine = CsmEngine.from_dir(
            config["model_dir"],
            device=device,
            schedule=config["schedule"],
            limits=config["limits"],
            max_streams=config["max_active"],
            cuda_graphs=config["cuda_graphs"],
        )
        pb_utils.Logger.log_info(
            f"{PREFIX} loaded {config['model_dir']} on {device} ({torch.get_num_threads()} torch threads); "
            f"chunk schedule {config['schedule']}; {config['limits']}; {self.engine.slot_summary}"
        )
        self.metrics = CsmMetrics(pb_utils, instance_labels(args, "csm_1b"))
        started = time.perf_counter()
        try:
            summary = self.engine.load_graphs()
        except GraphCaptureFailed as e:
            raise pb_utils.TritonModelException(f"{PREFIX} {e}") from None
        summary = f"{PREFIX} {summary} ({time.perf_counter() - started:.1f} s)"
        if self.engine.graphs.fallback:  # loud: eager frames are several times slower on a GPU
            pb_utils.Logger.log_error(summary)
        else:
            pb_utils.Logger.log_info(summary)
        self.metrics.graph_fallback(bool(self.engine.graphs.fallback))
        self.scheduler = StreamScheduler(
            self.engine,
            max_active=config["max_active"],
            max_queued=config["max_queued"],
            logger=lambda msg: pb_utils.Logger.log_info(f"{PREFIX} {msg}"),
            error_logger=lambda msg: pb_utils.Logger.log_error(f"{PREFIX} {msg}"),
            on_broken=self._on_broken,
            observer=self.metrics,
            max_queue_wait_s=config["max_queue_wait_s"],
            flow=config["flow"],
        )

    def _on_broken(self, reason):
        """The engine cannot serve any more (e.g. a CUDA error): its streams have failed and new requests are refused
        with UNAVAILABLE. Triton 2.51 cannot mark one Python model unready, so unless exit_on_engine_failure is off
        the whole server is asked to shut down: readiness fails, and the orchestrator restarts it."""
        parent = os.getppid()
        if self.exit_on_engine_failure and process_name(parent) == "tritonserver":
            pb_utils.Logger.log_error(f"{PREFIX} stopping tritonserver (pid {parent}) for a restart: {reason}")
            os.kill(parent, signal.SIGTERM)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            sink = None
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
                limit = (
                    f"up to {generation.max_audio_length_ms} ms" if generation.max_audio_length_ms else "length by text"
                )
                pb_utils.Logger.log_info(
                    f"{PREFIX} request {loggable_request_id(request)}: stream {sink.stream_id} queued "
                    f"({len(generation.text)} characters, {limit})"
                )
            except Exception as e:  # never raise out of execute once a sender is in use
                if isinstance(e, (InvalidRequest, InvalidWatermarkOption)):
                    code = "INVALID_ARG"
                elif isinstance(e, (ServerFull, EngineBroken)):
                    code = "UNAVAILABLE"
                else:
                    code = "INTERNAL"
                    pb_utils.Logger.log_error(f"{PREFIX} request failed: {type(e).__name__}: {e}")
                    e = f"request failed: {e}"
                if sink is not None:
                    sink.send_error(str(e), code)
                else:
                    send_error(sender, str(e), code)
        return None

    def finalize(self):
        pb_utils.Logger.log_info(f"{PREFIX} finalizing: waiting for streams in flight")
        self.scheduler.close()
        cancellation.close_all()
        self.metrics.close()
