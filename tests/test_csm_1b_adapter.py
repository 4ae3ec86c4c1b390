"""model_repository/csm_1b/1/model.py without a server: every request ends with exactly one final flag."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import fake_pb_utils as pb
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_model_module():
    pb.install()
    spec = importlib.util.spec_from_file_location(
        "csm_1b_model", ROOT / "model_repository" / "csm_1b" / "1" / "model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_config(model_dir: Path, decoupled: bool = True, **parameters) -> str:
    params = {"model_dir": str(model_dir), "max_active_streams": "2", "max_queued_streams": "1", **parameters}
    return json.dumps(
        {
            "model_transaction_policy": {"decoupled": decoupled},
            "parameters": {k: {"string_value": v} for k, v in params.items()},
        }
    )


@pytest.fixture
def model(tiny_csm_dir, monkeypatch):
    monkeypatch.delenv("CSM_WATERMARK_KEY", raising=False)
    module = load_model_module()
    instance = module.TritonPythonModel()
    instance.initialize(
        {"model_config": model_config(tiny_csm_dir), "model_instance_kind": "CPU", "model_instance_device_id": "0"}
    )
    yield instance
    instance.finalize()


def request(text="Hello.", **parameters):
    return pb.InferenceRequest(
        {"text": np.array([text.encode()], dtype=np.object_)}, {"max_audio_length_ms": 320, **parameters}
    )


def test_success_streams_chunks_and_one_final_flag(model):
    req = request(seed=1)
    assert model.execute([req]) is None
    assert req.sender.final.wait(30)
    responses = [r for r, _ in req.sender.sent]
    assert req.sender.final_flags == 1 and req.sender.sent[-1][1] == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    assert [bool(r.output("is_last")[0]) for r in responses] == [False, True]  # 3 frames, then the last one
    assert sum(r.output("audio").size for r in responses) == 4 * 1920


@pytest.mark.parametrize("parameters", [{"topk": 0}, {"watermark_key": "9"}, {"temperature": "hot"}])
def test_bad_input_is_one_invalid_arg_response_with_the_final_flag(model, parameters):
    req = request(**parameters)
    model.execute([req])
    assert req.sender.final_flags == 1 and len(req.sender.sent) == 1
    error = req.sender.sent[0][0].error()
    assert error.code() == "INVALID_ARG" and error.message().startswith("INVALID_ARG: ")


def test_full_server_answers_unavailable(model):
    requests = [request(max_audio_length_ms=2000, seed=i) for i in range(6)]
    model.execute(requests)
    refused = [
        r
        for r in requests
        if r.sender.sent
        and r.sender.sent[0][0] is not None
        and r.sender.sent[0][0].has_error()
        and r.sender.sent[0][0].error().code() == "UNAVAILABLE"
    ]
    assert refused, "with 2 active and 1 queued, some of 6 requests must be refused"
    for r in requests:
        assert r.sender.final.wait(60) and r.sender.final_flags == 1


def test_cancelled_request_ends_with_one_final_flag(model):
    req = request(max_audio_length_ms=20_000)
    model.execute([req])
    while not req.sender.sent:
        req.sender.final.wait(0.05)
    req.sender.cancelled = True
    assert req.sender.final.wait(30) and req.sender.final_flags == 1
    assert req.sender.sent[-1][0].error().code() == "CANCELLED"
    assert any("Cancelling the request" in line for line in pb.Logger.lines)


def test_model_refuses_to_load_when_not_decoupled(tiny_csm_dir):
    module = load_model_module()
    with pytest.raises(pb.TritonModelException, match="decoupled"):
        module.TritonPythonModel().initialize(
            {
                "model_config": model_config(tiny_csm_dir, decoupled=False),
                "model_instance_kind": "CPU",
                "model_instance_device_id": "0",
            }
        )


def test_invalid_server_watermark_key_stops_loading(tiny_csm_dir, monkeypatch):
    monkeypatch.setenv("CSM_WATERMARK_KEY", "1,2,300,4,5")
    module = load_model_module()
    with pytest.raises(ValueError, match="CSM_WATERMARK_KEY|watermark"):
        module.TritonPythonModel().initialize(
            {"model_config": model_config(tiny_csm_dir), "model_instance_kind": "CPU", "model_instance_device_id": "0"}
        )


BAD_CONFIG = [
    ({"first_chunk_frames": "0"}, "'first_chunk_frames' must be an integer from 1 to 1125, got 0"),
    ({"first_chunk_frames": "two"}, "'first_chunk_frames' must be an integer from 1 to 1125, got 'two'"),
    ({"chunk_growth": "0.5"}, "'chunk_growth' must be a number from 1 to 16, got '0.5'"),
    ({"chunk_growth": "nan"}, "'chunk_growth' must be a number from 1 to 16"),
    ({"max_chunk_frames": "1", "first_chunk_frames": "4"}, "'max_chunk_frames' (1) must be >= first_chunk_frames"),
    ({"max_active_streams": "0"}, "'max_active_streams' must be an integer from 1 to 1024, got 0"),
    ({"max_queued_streams": "-3"}, "'max_queued_streams' must be an integer from 1 to 100000"),
    ({"max_audio_length_ms": "10"}, "'max_audio_length_ms' must be an integer from 80 to 163840"),
    ({"max_context_audio_s": "1e9"}, "'max_context_audio_s' must be a number from 0 to 163.84"),
    ({"cpu_threads": "-1"}, "'cpu_threads' must be an integer from 0 to 1024"),
    ({"exit_on_engine_failure": "maybe"}, "'exit_on_engine_failure' must be true or false"),
    ({"max_unwatermarked_ms": "-1"}, "'max_unwatermarked_ms' must be an integer from 0 to 3600000"),
    ({"behind_queue_wait_ms": "soon"}, "'behind_queue_wait_ms' must be an integer from 0 to 3600000"),
    ({"cuda_graphs": "sometimes"}, "'cuda_graphs' must be one of auto, on, off, got 'sometimes'"),
]


@pytest.mark.parametrize("parameters, message", BAD_CONFIG, ids=[next(iter(p)) for p, _ in BAD_CONFIG])
def test_every_config_parameter_is_checked_at_load_with_its_name_and_range(tiny_csm_dir, parameters, message):
    module = load_model_module()
    with pytest.raises(pb.TritonModelException) as info:
        module.TritonPythonModel().initialize(
            {
                "model_config": model_config(tiny_csm_dir, **parameters),
                "model_instance_kind": "CPU",
                "model_instance_device_id": "0",
            }
        )
    assert message in str(info.value) and str(info.value).startswith("[csm_1b] invalid config: parameter")


def test_cpu_instances_run_the_configured_torch_threads(tiny_csm_dir):
    import torch

    before = torch.get_num_threads()
    module = load_model_module()
    instance = module.TritonPythonModel()
    try:
        instance.initialize(
            {
                "model_config": model_config(tiny_csm_dir, cpu_threads="1"),
                "model_instance_kind": "CPU",
                "model_instance_device_id": "0",
            }
        )
        assert torch.get_num_threads() == 1
        assert any("(1 torch threads)" in line for line in pb.Logger.lines)
    finally:
        instance.finalize()
        torch.set_num_threads(before)


def test_a_broken_engine_answers_unavailable_at_once(model):
    model.scheduler._break("injected CUDA error")
    req = request()
    model.execute([req])
    assert req.sender.final_flags == 1 and len(req.sender.sent) == 1
    error = req.sender.sent[0][0].error()
    assert error.code() == "UNAVAILABLE" and "injected CUDA error" in error.message()


def test_every_stream_removes_its_cancellation_marker(model, tmp_path, monkeypatch):
    monkeypatch.setenv("CSM_CANCEL_DIR", str(tmp_path / "markers"))
    requests = [request(seed=1), request(topk=0), request(max_audio_length_ms=20_000)]
    model.execute(requests)
    requests[2].sender.cancelled = True
    for req in requests:
        assert req.sender.final.wait(60) and req.sender.final_flags == 1
    assert not any((tmp_path / "markers").iterdir())


def test_a_tts_stream_reads_its_watermark_progress_and_a_direct_one_is_never_held(model, tmp_path, monkeypatch):
    from csm_tts.triton import cancellation

    monkeypatch.setenv("CSM_CANCEL_DIR", str(tmp_path / "markers"))
    sink = load_model_module().TritonSink(pb.ResponseSender())
    assert sink.marked and sink.samples_done() is None  # no report yet: a direct client until a watermarker speaks
    assert cancellation.report_progress(sink.stream_id, 0) and sink.samples_done() == 0
    assert cancellation.report_progress(sink.stream_id, 5760) and sink.samples_done() == 5760
    sink.close()
    assert sink.samples_done() is None


def test_stage_metrics_and_the_graph_fallback_gauge_exist(model):
    model.metrics.flush()
    families = pb.MetricFamily.families
    for name in ("csm_tts_codec_decode_seconds", "csm_tts_chunk_send_seconds", "csm_tts_held_seconds"):
        assert families[name].kind == pb.MetricFamily.HISTOGRAM
    assert families["csm_tts_cuda_graph_fallback"].metrics[-1].value() == 0  # a CPU runs eagerly by design
    req = request(seed=1)
    model.execute([req])
    assert req.sender.final.wait(30)
    model.metrics.flush()
    assert families["csm_tts_codec_decode_seconds"].metrics[-1].observations
    assert families["csm_tts_chunk_send_seconds"].metrics[-1].observations
    held = [m for m in families["csm_tts_streams"].metrics if m.labels.get("state") == "held"]
    assert held and held[-1].value() == 0


WATERMARKER_BAD_CONFIG = [
    ({"lookahead_frames": "7"}, "'lookahead_frames' must be an integer from 0 to 6, got 7"),
    ({"message_sdr": "-1"}, "'message_sdr' must be a number from 0 to 100"),
    ({"idle_timeout_s": "0"}, "'idle_timeout_s' (or CSM_WATERMARK_IDLE_TIMEOUT_S) must be a number from 0.1"),
    ({"max_streams": "0"}, "'max_streams' must be an integer from 1 to 100000"),
    ({"cpu_threads": "x"}, "'cpu_threads' must be an integer from 0 to 1024, got 'x'"),
]


@pytest.mark.parametrize(
    "parameters, message", WATERMARKER_BAD_CONFIG, ids=[next(iter(p)) for p, _ in WATERMARKER_BAD_CONFIG]
)
def test_every_watermarker_parameter_is_checked_at_load(tiny_watermark_dir, monkeypatch, parameters, message):
    monkeypatch.delenv("CSM_WATERMARK_IDLE_TIMEOUT_S", raising=False)
    pb.install()
    spec = importlib.util.spec_from_file_location(
        "watermarker_model", ROOT / "model_repository" / "watermarker" / "1" / "model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json.dumps(
        {
            "model_transaction_policy": {"decoupled": True},
            "parameters": {
                k: {"string_value": v} for k, v in {"model_dir": str(tiny_watermark_dir), **parameters}.items()
            },
        }
    )
    with pytest.raises(pb.TritonModelException) as info:
        module.TritonPythonModel().initialize(
            {"model_config": config, "model_instance_kind": "CPU", "model_instance_device_id": "0"}
        )
    assert message in str(info.value)


@pytest.mark.parametrize("exit_on_failure", [True, False])
def test_a_broken_engine_stops_tritonserver_for_a_restart_unless_told_not_to(model, monkeypatch, exit_on_failure):
    """Triton 2.51 cannot mark one Python model unready: the model asks its server to shut down (readiness fails and
    the orchestrator restarts it). Only a parent that is tritonserver is ever signalled."""
    import os
    import signal

    adapter = type(model).initialize.__globals__  # the model.py module's namespace
    signals = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: signals.append((pid, sig)))
    monkeypatch.setitem(adapter, "process_name", lambda pid: "tritonserver")
    model.exit_on_engine_failure = exit_on_failure
    model.scheduler._break("injected CUDA error")
    assert signals == ([(os.getppid(), signal.SIGTERM)] if exit_on_failure else [])
    monkeypatch.setitem(adapter, "process_name", lambda pid: "pytest")
    model._on_broken("again")
    assert len(signals) == (1 if exit_on_failure else 0)
