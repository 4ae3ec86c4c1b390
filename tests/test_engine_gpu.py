"""The CUDA-graph frame step against the same engine run eagerly, on a CUDA GPU (tiny checkpoint, fp32).

Marked `gpu` and skipped, with that reason, where torch sees no CUDA device (development machines and CI): see the
README's "what runs where". On a GPU host: `python -m pytest -m gpu`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine_slots import SCRIPT, generate_codes, run_script

from csm_tts.speech.engine import CsmEngine
from csm_tts.speech.request import GenerationRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs); none is visible"),
]


@pytest.fixture(scope="module")
def engines(tiny_csm_dir):
    graphs = CsmEngine.from_dir(tiny_csm_dir, device="cuda", dtype=torch.float32, max_streams=8)
    eager = CsmEngine(graphs.model, graphs.processor, max_streams=8, cuda_graphs=False)
    return graphs, eager


def test_graphs_are_on_by_default_on_cuda_and_captured_per_shape(engines):
    graphs, eager = engines
    assert graphs.cuda_graphs and not eager.cuda_graphs
    count = graphs.capture_graphs(max_window=512)
    assert count == len(graphs.batch_sizes) * 2 * len(graphs.topk_bounds)  # windows 256 and 512


def test_graph_replay_equals_eager_with_streams_joining_and_leaving(engines):
    graphs, eager = engines
    replayed, reference = run_script(graphs), run_script(eager)
    for name in SCRIPT:
        assert torch.equal(replayed[name]["codes"], reference[name]["codes"]), name
        assert np.array_equal(replayed[name]["audio"], reference[name]["audio"]), name
    # Greedy on the GPU is still transformers' greedy.
    assert torch.equal(generate_codes(graphs, SCRIPT["C"][1], 12), replayed["C"]["codes"])


def test_graph_capture_while_streams_run_leaves_them_intact(tiny_csm_dir, engines):
    """Shapes first seen mid-stream are captured then (warm-up run included) without disturbing running streams."""
    _, eager = engines
    lazy = CsmEngine(eager.model, eager.processor, max_streams=8)  # nothing captured in advance
    requests = [
        GenerationRequest(f"Stream number {i} says hello.", seed=i, topk=[50, 2048][i % 2], max_audio_length_ms=960)
        for i in range(5)
    ]
    results = []
    for engine in (lazy, eager):
        streams = []
        for request in requests:  # one joins per frame: the batch grows through buckets 1, 2, 4, 8
            streams.append(engine.start(request))
            engine.step_many(streams)
        while not all(s.finished for s in streams):
            engine.step_many(streams)
        results.append([torch.stack(s.pending) for s in streams])
    assert len(lazy.graphs.graphs) >= 4
    for replayed, reference in zip(*results, strict=True):
        assert torch.equal(replayed, reference)
