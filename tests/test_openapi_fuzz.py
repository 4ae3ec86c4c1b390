"""Property-based fuzzing of GET /openapi.json's description against the live proxy (`python -m proxy` in front of
the session's real Triton) with schemathesis: no 5xx, no hang (a timeout per call), every status, Content-Type and
JSON body as described. Bounded: a fixed number of examples per operation, and each generation is kept to 1 s of
audio without the watermark (the tiny CPU model would otherwise spend minutes on 90 s texts; the bounds of those
fields are what tests/test_openapi.py checks against the parser)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from csm_tts.tooling.local_triton import free_port
from proxy import __version__
from proxy.parse.openapi import openapi_document

pytestmark = pytest.mark.live
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = 5  # per operation (about 2 minutes here in all)
CALL_TIMEOUT_S = 30  # "no hang"
SCHEMA = schemathesis.openapi.from_dict(openapi_document(__version__))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
GENERATING = ("/generate", "/generate/wav", "/generate/audio", "/v1/audio/speech")


@pytest.fixture(scope="module")
def fuzz_proxy(triton_server, tmp_path_factory):
    port = free_port()
    env = {
        **os.environ,
        "PROXY_PORT": str(port),
        "TRITON_GRPC_URLS": triton_server.grpc_url,
        "PROXY_LOG_LEVEL": "WARNING",
    }
    log_path = tmp_path_factory.mktemp("fuzz") / "proxy.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(base + "/livez", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(20)
    output = log_path.read_text(errors="replace")
    assert "Traceback" not in output, output[-3000:]


def bounded(case) -> None:
    """Keep a generated request cheap to serve (see the module doc): 1 s of audio, no watermark, two texts."""
    if case.path in GENERATING and isinstance(case.body, dict):
        case.body = {**case.body, "max_audio_length_ms": 1000, "watermark": False}
        case.body.pop("watermark_key", None)
    if case.path == "/stream/chunks":
        case.query = {**(case.query or {}), "max_audio_length_ms": 1000, "watermark": "false"}
        if isinstance(case.body, list):
            case.body = case.body[:2]


@SCHEMA.parametrize()
@settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True
)
def test_the_live_proxy_answers_as_described(case, fuzz_proxy):
    bounded(case)
    case.call_and_validate(base_url=fuzz_proxy, checks=CHECKS, timeout=CALL_TIMEOUT_S)
