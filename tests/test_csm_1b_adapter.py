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
    assert [bool(r.output("is_last")[0]) for r in responses] == [False, True]  # 2 frames, then the last 2
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
