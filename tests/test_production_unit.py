"""Running it in production, the parts that need no Triton: API keys and their limits, the watermark policy, request
ids, the metrics endpoint, replica discovery bookkeeping, the JSON log format, the keys script, the Triton-side metrics
(with tests/fake_pb_utils.py) and the watermarker's state errors (5xx, not the client's fault)."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import fake_pb_utils as pb
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from csm_tts.tooling.local_triton import free_port
from proxy.admission import WatermarkPolicy
from proxy.app import create_app
from proxy.auth import ApiKeys, KeyFileError, LimitReached, generate_key, hash_key, parse_keys, presented_key
from proxy.errors import ApiError
from proxy.logs import JsonFormatter, RequestIdFilter
from proxy.parse.job import GenerateOptions
from proxy.scope import RequestScope, accept_request_id, enter_scope, leave_scope
from proxy.settings import Settings, SettingsError
from proxy.upstream import stages
from proxy.upstream.discovery import ServiceDiscovery, grpc_target
from proxy.upstream.pool import Replica, ReplicaHealth, TritonPool

ROOT = Path(__file__).resolve().parent.parent


# -- keys ------------------------------------------------------------------------------------------------------------
def test_keys_are_token_safe_and_stored_as_hashes():
    key = generate_key()
    assert key.startswith("sk-") and len(key) > 40
    assert all(c.isalnum() or c in "-_" for c in key)  # an HTTP token: fits a header and a WebSocket subprotocol
    keys = ApiKeys(parse_keys({"keys": [{"name": "a", "sha256": hash_key(key)}]}))
    assert keys.authenticate(key).name == "a"
    assert keys.authenticate(key + "x") is None and keys.authenticate(None) is None and keys.authenticate("") is None


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "expected"),
        ({"keys": [{"name": "a"}]}, "sha256"),
        ({"keys": [{"name": "a b", "sha256": "0" * 64}]}, "name"),
        ({"keys": [{"name": "a", "sha256": "0" * 64, "max_streams": 0}]}, "max_streams"),
        ({"keys": [{"name": "a", "sha256": "0" * 64, "allow_watermark_off": "yes"}]}, "allow_watermark_off"),
        ({"keys": [{"name": "a", "sha256": "0" * 64, "key": "sk-oops"}]}, "unknown field"),
        ({"keys": [{"name": "a", "sha256": "0" * 64}, {"name": "a", "sha256": "1" * 64}]}, "twice"),
    ],
)
def test_bad_key_files_are_refused_with_the_reason(data, message):
    with pytest.raises(KeyFileError, match=message):
        parse_keys(data)


def test_a_bad_keys_file_stops_the_proxy_at_start(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    with pytest.raises(SettingsError, match="PROXY_API_KEYS_FILE.*not valid JSON"):
        create_app(Settings(api_keys_file=str(path)))
    with pytest.raises(SettingsError, match="cannot read"):
        create_app(Settings(api_keys_file=str(tmp_path / "missing.json")))


def test_key_limits_streams_and_rate():
    [key] = parse_keys({"keys": [{"name": "a", "sha256": "0" * 64, "max_streams": 2, "requests_per_minute": 3}]})
    key.take_stream(now=0.0)
    key.take_stream(now=1.0)
    with pytest.raises(LimitReached, match="2 streams open") as info:
        key.take_stream(now=2.0)
    assert info.value.retry_after_s == 1
    key.release_stream()
    key.take_stream(now=10.0)  # the third stream of the minute
    key.release_stream()
    with pytest.raises(LimitReached, match="3 streams in the last minute") as info:
        key.take_stream(now=20.0)
    assert info.value.retry_after_s == 40  # the first one leaves the window at 60 s
    key.take_stream(now=60.5)  # it did


def test_presented_key_header_or_websocket_subprotocol():
    assert presented_key({"Authorization": "Bearer sk-abc"}, websocket=False) == "sk-abc"
    assert presented_key({"Authorization": "bearer  sk-abc "}, websocket=False) == "sk-abc"
    assert presented_key({"Authorization": "Basic xyz"}, websocket=False) is None
    protocols = {"Sec-WebSocket-Protocol": "csm-tts, bearer.sk-abc"}
    assert presented_key(protocols, websocket=True) == "sk-abc"
    assert presented_key(protocols, websocket=False) is None  # only on a WebSocket upgrade
    assert presented_key({"Sec-WebSocket-Protocol": "csm-tts, bearer."}, websocket=True) is None


def test_api_key_script_prints_the_key_once_and_stores_its_hash(tmp_path):
    path = tmp_path / "keys.json"
    script = [sys.executable, str(ROOT / "scripts" / "api_key.py")]
    run = subprocess.run(
        [*script, "web-app", "--max-streams", "2", "--no-allow-watermark-off", "--file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    key = run.stdout.strip()
    assert key.startswith("sk-") and key not in path.read_text()
    [entry] = json.loads(path.read_text())["keys"]
    assert entry == {"name": "web-app", "sha256": hash_key(key), "max_streams": 2, "allow_watermark_off": False}
    assert ApiKeys.load(path).authenticate(key).max_streams == 2
    again = subprocess.run([*script, "web-app", "--file", str(path)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "twice" in again.stderr  # names are unique
    assert len(json.loads(path.read_text())["keys"]) == 1


# -- watermark policy ------------------------------------------------------------------------------------------------
def test_watermark_policy_forbids_with_403():
    strict = WatermarkPolicy(allow_disable=False, allow_custom_key=False)
    strict.check(GenerateOptions(text="x"))
    strict.check(GenerateOptions(text="x", watermark=True))
    with pytest.raises(ApiError, match="watermark off") as info:
        strict.check(GenerateOptions(text="x", watermark=False))
    assert info.value.status == 403
    with pytest.raises(ApiError, match="watermark key") as info:
        strict.check(GenerateOptions(text="x", watermark_key=(1, 2, 3, 4, 5)))
    assert info.value.status == 403
    # When the server's default is off, asking for no watermark asks for the default.
    WatermarkPolicy(allow_disable=False, watermark_default=False).check(GenerateOptions(text="x", watermark=False))
    [key] = parse_keys({"keys": [{"name": "a", "sha256": "0" * 64, "allow_watermark_off": True}]})
    strict.for_key(key).check(GenerateOptions(text="x", watermark=False))  # a key may be trusted more
    with pytest.raises(ApiError):
        strict.for_key(key).check(GenerateOptions(text="x", watermark_key=(1, 2, 3, 4, 5)))


def test_policy_and_production_settings_from_env():
    s = Settings.from_env(
        {
            "CSM_WATERMARK_ALLOW_DISABLE": "false",
            "CSM_WATERMARK_ALLOW_CUSTOM_KEY": "no",
            "CSM_WATERMARK_KEY_SOURCE": "private",
            "PROXY_DRAIN_S": "100",
            "PROXY_LOG_FORMAT": "json",
            "TRITON_GRPC_SERVICE": "csm-tts-triton.csm-tts.svc.cluster.local:8001",
            "PROXY_API_KEYS_FILE": "/etc/csm-tts/keys/keys.json",
        }
    )
    assert s.watermark_allow_disable is False and s.watermark_allow_custom_key is False
    assert s.watermark_key_source == "private" and s.drain_s == 100 and s.log_format == "json"
    assert s.triton_grpc_service == "csm-tts-triton.csm-tts.svc.cluster.local:8001"
    assert s.triton_grpc_urls == ()  # only discovered replicas unless TRITON_GRPC_URLS is given too
    assert s.api_keys_file == "/etc/csm-tts/keys/keys.json"
    for env, name in [
        ({"CSM_WATERMARK_KEY_SOURCE": "secret"}, "CSM_WATERMARK_KEY_SOURCE"),
        ({"TRITON_GRPC_SERVICE": "a:1,b:2"}, "TRITON_GRPC_SERVICE"),
        ({"PROXY_LOG_FORMAT": "xml"}, "PROXY_LOG_FORMAT"),
        ({"PROXY_DRAIN_S": "-1"}, "PROXY_DRAIN_S"),
    ]:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env(env)


# -- request ids and logs --------------------------------------------------------------------------------------------
def test_request_ids_are_kept_when_safe_and_replaced_otherwise():
    assert accept_request_id("abc-123.x:y_z") == "abc-123.x:y_z"
    for bad in (None, "", "a b", "x" * 129, "line\nbreak", 'quote"'):
        fresh = accept_request_id(bad)
        assert fresh != bad and accept_request_id(fresh) == fresh
    scope = RequestScope("rid", "/stream")
    assert [scope.next_triton_request_id() for _ in range(3)] == ["rid", "rid.1", "rid.2"]


def test_json_log_lines_carry_the_request_id():
    record = logging.LogRecord("proxy", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    token = enter_scope(RequestScope("rid-7", "/generate"))
    try:
        RequestIdFilter().filter(record)
    finally:
        leave_scope(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "rid-7" and line["message"] == "hello there" and line["level"] == "INFO"
    outside = logging.LogRecord("proxy", logging.INFO, __file__, 1, "no request", (), None)
    RequestIdFilter().filter(outside)
    assert "request_id" not in json.loads(JsonFormatter().format(outside))


# -- the HTTP side without Triton ------------------------------------------------------------------------------------
OPERATOR_KEY = generate_key()
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}  # /metrics is for operators when keys are on


@pytest.fixture
async def keyed_client(aiohttp_client, tmp_path):
    key = generate_key()
    path = tmp_path / "keys.json"
    operator = {"name": "ops", "sha256": hash_key(OPERATOR_KEY), "operator": True}
    path.write_text(json.dumps({"keys": [{"name": "tester", "sha256": hash_key(key)}, operator]}))
    settings = Settings(triton_grpc_urls=(f"127.0.0.1:{free_port()}",), api_keys_file=str(path), health_timeout_s=0.3)
    return await aiohttp_client(create_app(settings)), key


async def test_open_paths_need_no_key_and_everything_else_does(keyed_client):
    client, key = keyed_client
    for path in ("/", "/livez", "/readyz"):
        response = await client.get(path)
        assert response.status == 200, path
        assert response.headers["X-Request-ID"]
    for method, path in (("POST", "/generate"), ("POST", "/stream/chunks"), ("GET", "/stream"), ("GET", "/nope")):
        response = await client.request(method, path, json={"text": "hi"})
        body = await response.json()
        assert response.status == 401 and "API key" in body["error"], (path, body)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    response = await client.post("/generate", json={"text": "hi"}, headers={"Authorization": "Bearer sk-wrong"})
    assert response.status == 401 and (await response.json())["error"] == "Invalid API key"
    # With the key the request reaches Triton, which is down here: 503, not 401.
    response = await client.post("/generate", json={"text": "hi"}, headers={"Authorization": f"Bearer {key}"})
    assert response.status == 503
    metrics = await (await client.get("/metrics", headers=OPERATOR)).text()
    assert key not in metrics and "sk-wrong" not in metrics
    assert 'csm_proxy_rejections_total{reason="unauthorized"} 5.0' in metrics


async def test_websocket_key_as_subprotocol(keyed_client, caplog):
    client, key = keyed_client
    ws = await client.ws_connect("/stream", protocols=("csm-tts", f"bearer.{key}"))
    assert ws.protocol == "csm-tts"  # selected: never the key
    await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/stream", protocols=(f"bearer.{key}",))  # the key alone: told what to offer
    assert info.value.status == 400
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/stream", protocols=("csm-tts", "bearer.sk-not-a-key"))
    assert info.value.status == 401
    assert key not in caplog.text


def test_library_log_lines_never_show_a_key(caplog):
    from proxy.logs import redact_keys_in_library_logs

    redact_keys_in_library_logs()
    key = generate_key()
    logging.getLogger("aiohttp.websocket").warning("Client protocols %r don't overlap", [f"bearer.{key}"])
    assert key not in caplog.text and "sk-<redacted>" in caplog.text


async def test_request_id_is_echoed_or_made(keyed_client):
    client, _ = keyed_client
    response = await client.get("/", headers={"X-Request-ID": "trace-42"})
    assert response.headers["X-Request-ID"] == "trace-42"
    response = await client.get("/nope", headers={"X-Request-ID": "bad id"})
    assert response.status == 401 and response.headers["X-Request-ID"] not in ("", "bad id")


async def test_metrics_parse_and_label_routes_not_paths(keyed_client):
    client, _ = keyed_client
    for path in ("/random-1", "/random-2"):
        await client.get(path)
    text = await (await client.get("/metrics", headers=OPERATOR)).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "csm_proxy_requests",
        "csm_proxy_time_to_first_audio_seconds",
        "csm_proxy_real_time_factor",
        "csm_proxy_stream_duration_seconds",
        "csm_proxy_active_streams",
        "csm_proxy_active_websockets",
        "csm_proxy_upstream_errors",
        "csm_proxy_rejections",
        "csm_proxy_triton_replicas",
    ):
        assert name in families, name
    endpoints = {s.labels.get("endpoint") for s in families["csm_proxy_requests"].samples}
    assert "unmatched" in endpoints and not any(e and e.startswith("/random") for e in endpoints)


async def test_draining_proxy_is_not_ready_and_refuses_work(aiohttp_client):
    from proxy.appkeys import DRAIN

    app = create_app(Settings(triton_grpc_urls=(f"127.0.0.1:{free_port()}",), health_timeout_s=0.3))
    client = await aiohttp_client(app)
    assert (await client.get("/readyz")).status == 200
    app[DRAIN].begin()
    response = await client.get("/readyz")
    assert response.status == 503 and (await response.json())["status"] == "draining"
    assert (await client.get("/livez")).status == 200
    response = await client.post("/generate", json={"text": "hi"})
    assert response.status == 503 and response.headers["Retry-After"] == "1"
    assert "shutting down" in (await response.json())["error"]


# -- discovery bookkeeping -------------------------------------------------------------------------------------------
async def test_discovery_adds_and_retires_replicas_and_survives_resolver_failures():
    answers = [["127.0.0.2", "127.0.0.3"], ["127.0.0.3", "127.0.0.4"], OSError("no such host"), []]

    async def resolver(host, port):
        assert (host, port) == ("triton.test", 8001)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    pool = TritonPool([], "tts", health_timeout_s=0.2)
    discovery = ServiceDiscovery(pool, "triton.test:8001", resolver=resolver)
    try:
        await discovery.refresh()
        assert [r.url for r in pool.replicas] == ["127.0.0.2:8001", "127.0.0.3:8001"]
        first = pool.replicas[0]
        first.active_streams = 1  # a stream still runs there
        await discovery.refresh()
        assert [r.url for r in pool.replicas] == ["127.0.0.3:8001", "127.0.0.4:8001"]
        assert first.retired and pool.retired == [first] and not first.healthy("tts")
        first.active_streams = 0
        await discovery.refresh()  # the resolver fails: nothing changes
        await discovery.refresh()  # it answers nothing: nothing changes either
        assert [r.url for r in pool.replicas] == ["127.0.0.3:8001", "127.0.0.4:8001"]
        await pool._close_retired()
        assert pool.retired == []
    finally:
        await pool.close()
    assert grpc_target("::1", 8001) == "[::1]:8001" and grpc_target("10.0.0.5", 8001) == "10.0.0.5:8001"


# What Triton 2.51 serves on its metrics port for our gauges (two csm_1b instances; histograms and Triton's own
# families around them), as tests/test_flow_control_live.py reads it from a live server.
TRITON_METRICS = """\
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="csm_1b",version="1"} 0
# HELP csm_tts_streams Streams held by a csm_1b instance: state=active (generating) or queued (waiting)
# TYPE csm_tts_streams gauge
csm_tts_streams{instance="csm_1b_0",model="csm_1b",state="held"} 3
csm_tts_streams{instance="csm_1b_0",model="csm_1b",state="queued"} 1
csm_tts_streams{instance="csm_1b_0",model="csm_1b",state="active"} 8
csm_tts_streams{instance="csm_1b_1",model="csm_1b",state="active"} 2
# HELP csm_tts_watermarker_behind 1 while a csm_1b instance finds the watermarker behind its listeners
# TYPE csm_tts_watermarker_behind gauge
csm_tts_watermarker_behind{instance="csm_1b_0",model="csm_1b"} 1
csm_tts_watermarker_behind{instance="csm_1b_1",model="csm_1b"} 0
# HELP csm_tts_held_seconds Time a csm_1b stream spent held back
# TYPE csm_tts_held_seconds histogram
csm_tts_held_seconds_count{instance="csm_1b_0",model="csm_1b"} 4
csm_tts_held_seconds_sum{instance="csm_1b_0",model="csm_1b"} 1.5
csm_tts_held_seconds_bucket{instance="csm_1b_0",model="csm_1b",le="0.01"} 0
csm_tts_held_seconds_bucket{instance="csm_1b_0",model="csm_1b",le="+Inf"} 4
# HELP csm_tts_watermark_queued_chunks Chunks waiting at the watermarker
# TYPE csm_tts_watermark_queued_chunks gauge
csm_tts_watermark_queued_chunks{instance="watermarker_0",model="watermarker"} 17
# HELP csm_tts_watermark_queued_audio_seconds Audio waiting at the watermarker
# TYPE csm_tts_watermark_queued_audio_seconds gauge
csm_tts_watermark_queued_audio_seconds{instance="watermarker_0",model="watermarker"} 6.54321
"""


def test_stage_load_is_read_from_tritons_metrics():
    load = stages.parse(TRITON_METRICS)
    assert load.behind == ["watermarker"]  # one instance of two says so: that replica's watermarker is behind
    assert load.stages == {
        "csm_1b": {"active_streams": 10, "queued_streams": 1, "held_streams": 3},
        "watermarker": {"queued_chunks": 17, "queued_audio_s": 6.54},
    }
    calm = stages.parse(TRITON_METRICS.replace('model="csm_1b"} 1', 'model="csm_1b"} 0'))
    assert calm.behind == [] and calm.as_json()["behind"] == []
    assert stages.parse("").stages == {}  # an older model repository: no gauges, nothing behind
    with pytest.raises(ValueError):
        stages.parse("csm_tts_streams{state=active 3\n")


async def test_the_pool_names_stages_behind_on_serving_replicas_only():
    pool = TritonPool(["127.0.0.1:1"], "tts", health_timeout_s=0.2, metrics_port=free_port())
    try:
        replica = pool.replicas[0]
        assert replica.metrics_url.startswith("http://127.0.0.1:") and replica.metrics_url.endswith("/metrics")
        replica.health = ReplicaHealth(live=True, ready=True, models={"tts": {"state": "READY"}})
        assert pool.behind() == {}
        replica.health.load = stages.parse(TRITON_METRICS)
        assert pool.behind() == {"watermarker": ["127.0.0.1:1"]}
        replica.retired = True  # a replica that serves nothing is behind for nobody
        assert pool.behind() == {}
    finally:
        await pool.close()
    assert Replica("[::1]:8001", metrics_port=8002).metrics_url == "http://[::1]:8002/metrics"
    assert Replica("triton:8001").metrics_url is None
    assert Settings.from_env({}).triton_metrics_port == 8002
    assert Settings.from_env({"TRITON_METRICS_PORT": "off"}).triton_metrics_port is None
    with pytest.raises(SettingsError, match="TRITON_METRICS_PORT"):
        Settings.from_env({"TRITON_METRICS_PORT": "0"})


# -- Triton-side metrics and the watermarker's errors (fake pb_utils) ------------------------------------------------
def test_csm_metrics_follow_the_scheduler(engine):
    from csm_tts.speech.request import GenerationRequest
    from csm_tts.speech.scheduler import StreamScheduler
    from csm_tts.triton.metrics import CsmMetrics

    pb.MetricFamily.families.clear()
    metrics = CsmMetrics(pb, {"model": "csm_1b", "instance": "csm_1b_0"})

    class Sink:
        def __init__(self):
            self.done = False

        def send_chunk(self, stream, chunk):
            self.done = self.done or chunk.is_last

        def send_error(self, message, code):
            self.done = True

        def is_cancelled(self):
            return False

    scheduler = StreamScheduler(engine, max_active=2, max_queued=4, logger=lambda m: None, observer=metrics)
    sinks = [Sink() for _ in range(3)]
    seen = set()
    try:
        for sink in sinks:
            scheduler.submit(GenerationRequest(text="hi", max_audio_length_ms=400, seed=1), sink)
        deadline = time.monotonic() + 60
        while not all(s.done for s in sinks) and time.monotonic() < deadline:
            seen.add((metrics.active.value(), metrics.queued.value()))
            time.sleep(0.001)
    finally:
        scheduler.close()
    assert all(s.done for s in sinks)
    assert max(a for a, _ in seen) == 2  # max_active
    metrics.flush()
    assert (metrics.active.value(), metrics.queued.value()) == (0, 0)
    metrics.occupancy(1, 0, held=1, behind=True)  # what the scheduler reports while the watermarker is behind
    metrics.flush()
    assert (metrics.held.value(), metrics.behind.value()) == (1, 1)
    steps = pb.MetricFamily.families["csm_tts_frame_step_seconds"].metrics[0].observations
    assert steps and all(s > 0 for s in steps)
    assert metrics.frames.value() == 3 * 5  # 400 ms = 5 frames each


def load_watermarker(tiny_watermark_dir):
    pb.install()
    spec = importlib.util.spec_from_file_location(
        "watermarker_model", ROOT / "model_repository" / "watermarker" / "1" / "model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = {
        "model_transaction_policy": {"decoupled": True},
        "parameters": {"model_dir": {"string_value": str(tiny_watermark_dir)}},
    }
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_instance_kind": "CPU",
            "model_instance_device_id": "0",
            "model_instance_name": "watermarker_0",
        }
    )
    return model


def chunk_request(stream_id, index, offset, audio, is_last, request_id="rid-w"):
    inputs = {
        "audio": audio,
        "stream_id": np.array([stream_id.encode()], dtype=np.object_),
        "chunk_index": np.array([index], np.int32),
        "sample_offset": np.array([offset], np.int64),
        "is_last": np.array([is_last]),
    }
    return pb.InferenceRequest(inputs, {"watermark": True}, request_id=request_id)


def answers(model, requests):
    """The decoupled watermarker's one final response to each request (sent by its batching thread)."""
    assert model.execute(requests) is None
    for request in requests:
        assert request.sender.final.wait(30)
        assert request.sender.final_flags == 1 and len(request.sender.sent) == 1
    return [request.sender.sent[0][0] for request in requests]


def test_watermarker_state_errors_are_internal_and_logged_with_the_request_id(tiny_watermark_dir, monkeypatch):
    monkeypatch.delenv("CSM_WATERMARK_KEY", raising=False)
    pb.MetricFamily.families.clear()
    model = load_watermarker(tiny_watermark_dir)
    try:
        audio = np.zeros(1920, np.float32)
        [orphan] = answers(model, [chunk_request("a" * 32, 3, 5760, audio, False)])  # a chunk of an unknown stream
        assert orphan.has_error() and orphan.error().code() == "INTERNAL"  # -> 502 at the proxy, not 422
        assert orphan.error().message().startswith("INTERNAL: ")
        [ok] = answers(model, [chunk_request("b" * 32, 0, 0, audio, True, request_id="rid-done")])
        assert not ok.has_error()
        assert any("request rid-done: stream " + "b" * 32 + " finished" in line for line in pb.Logger.lines)
        model.metrics.flush()
        latency = pb.MetricFamily.families["csm_tts_watermark_chunk_seconds"].metrics[0]
        assert len(latency.observations) == 2 and latency.labels["instance"] == "watermarker_0"
    finally:
        model.finalize()
