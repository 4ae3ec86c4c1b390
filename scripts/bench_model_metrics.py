"""What the models' custom metrics cost: time per call of csm_tts/triton/metrics.py inside a real Triton Python model.

Every `pb_utils` metric call is a round trip from the model's stub process to the Triton server. csm_1b makes two per
frame step (`frame_step`: a histogram observation and a counter increment) plus two gauge writes when the number of
streams changes; the watermarker one observation per chunk. Those calls are queued and made by a reporter thread
(csm_tts.triton.metrics.Reporter), so the model's own thread only pays for the queueing. This script starts the local
Triton with a throw-away model that calls those same methods N times from a background thread (as csm_1b's scheduler
does) and prints both costs per call: on the caller's thread, and until the reporter has made the call.

    .venv/bin/python scripts/bench_model_metrics.py --calls 2000
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from csm_tts.tooling.local_triton import TritonServer, free_port  # noqa: E402

MODEL = textwrap.dedent(
    """
    import threading, time
    import triton_python_backend_utils as pb_utils
    from csm_tts.triton.metrics import CsmMetrics, WatermarkMetrics

    CALLS = {calls}

    class TritonPythonModel:
        def initialize(self, args):
            csm = CsmMetrics(pb_utils, {{"model": "bench", "instance": "bench_0"}})
            wm = WatermarkMetrics(pb_utils, {{"model": "bench_wm", "instance": "bench_0"}})
            results = {{}}

            def run():
                for name, call in (
                    ("frame_step", lambda i: csm.frame_step(0.02, 4)),
                    ("occupancy_change", lambda i: csm.occupancy(i % 8, i % 3)),
                    ("watermark_chunk", lambda i: wm.chunk(0.01)),
                ):
                    started = time.perf_counter()
                    for i in range(CALLS):
                        call(i)
                    queued = time.perf_counter()
                    csm.flush()
                    wm.flush()
                    done = time.perf_counter()
                    results[name] = ((queued - started) / CALLS * 1e6, (done - started) / CALLS * 1e6)

            thread = threading.Thread(target=run)  # like csm_1b's scheduler thread
            thread.start()
            thread.join()
            for name, (caller, made) in results.items():
                pb_utils.Logger.log_info(f"[bench] {{name}} {{caller:.1f}} {{made:.1f}} us per call")
            csm.close()
            wm.close()

        def execute(self, requests):
            return [pb_utils.InferenceResponse(output_tensors=[]) for _ in requests]
    """
)
CONFIG = (
    'name: "bench"\nbackend: "python"\nmax_batch_size: 0\ninput [{ name: "x", data_type: TYPE_FP32, dims: [1] }]\n'
    'output [{ name: "y", data_type: TYPE_FP32, dims: [1] }]\ninstance_group [{ kind: KIND_CPU, count: 1 }]\n'
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls of each method")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        model_dir = Path(tmp, "repo", "bench", "1")
        model_dir.mkdir(parents=True)
        (model_dir / "model.py").write_text(MODEL.format(calls=args.calls))
        (model_dir.parent / "config.pbtxt").write_text(CONFIG)
        server = TritonServer(
            Path(tmp, "repo"),
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            log_path=Path(tmp, "triton.log"),
        )
        with server:
            log = server.log_text()
    results = {name: (float(a), float(b)) for name, a, b in re.findall(r"\[bench\] (\w+) ([\d.]+) ([\d.]+) us", log)}
    if len(results) != 3:
        print(f"no results in the Triton log:\n{log[-3000:]}", file=sys.stderr)
        return 1
    print(f"{'method':18s} {'caller us':>10s} {'made us':>10s}   (per method call, {args.calls} calls)")
    for name, (caller, made) in results.items():
        print(f"{name:18s} {caller:10.1f} {made:10.1f}")
    caller = results["frame_step"][0]
    print(f"csm_1b frame loop pays {caller:.1f} us per frame step = {caller / 80_000 * 100:.4f} % of an 80 ms frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
