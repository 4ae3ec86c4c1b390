"""How loaded each stage of a Triton replica is, read from the models' own gauges on Triton's metrics port.

gRPC says whether a model is ready, not whether it keeps up. csm_1b and the watermarker publish that on Triton's
Prometheus endpoint (csm_tts/triton/metrics.py): streams generating, queued and held back, whether csm_1b finds the
watermarker behind its listeners (then it starts no new stream), and the watermarker's queue. The proxy reads them
with each health check so that `/health` and its own metrics name a stage that is behind.

Plain Python (no aiohttp, no gRPC): one small HTTP GET with the standard library, run in a thread by the pool.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# gauge -> (stage, field); the values of a model's instances are summed.
GAUGES = {
    ("csm_tts_streams", "active"): ("csm_1b", "active_streams"),
    ("csm_tts_streams", "queued"): ("csm_1b", "queued_streams"),
    ("csm_tts_streams", "held"): ("csm_1b", "held_streams"),
    ("csm_tts_watermarker_behind", None): ("watermarker", "behind"),
    ("csm_tts_watermark_streams", None): ("watermarker", "streams"),
    ("csm_tts_watermark_queued_chunks", None): ("watermarker", "queued_chunks"),
    ("csm_tts_watermark_queued_audio_seconds", None): ("watermarker", "queued_audio_s"),
}
MAX_BYTES = 4 << 20  # a metrics page is tens of kB; never read an unbounded body


@dataclass
class StageLoad:
    stages: dict[str, dict[str, float]]  # stage -> field -> value
    behind: list[str]  # stages that do not keep up now

    def as_json(self) -> dict:
        return {"behind": self.behind, **self.stages}


def parse(text: str) -> StageLoad:
    stages: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, sample.labels.get("state"))
            if key in GAUGES:
                stage, name = GAUGES[key]
                fields = stages.setdefault(stage, {})
                fields[name] = fields.get(name, 0.0) + sample.value
    behind = ["watermarker"] if stages.get("watermarker", {}).pop("behind", 0) > 0 else []
    for fields in stages.values():
        for name, value in fields.items():
            fields[name] = round(value, 2) if name.endswith("_s") else int(value)
    return StageLoad(stages, behind)


def read(url: str, timeout_s: float) -> StageLoad:
    """GET `url` (Triton's /metrics) and parse it; raises OSError (unreachable, timeout) or ValueError (not metrics)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return parse(response.read(MAX_BYTES).decode("utf-8", "replace"))
