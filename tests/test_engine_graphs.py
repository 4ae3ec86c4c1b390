"""The `cuda_graphs` policy (csm_tts/speech/graphs.py) on a CPU: capture is made to fail, or to replay something
else, and `auto` must fall back to eager frames while `on` fails the load. (Real captures: tests/test_engine_gpu.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csm_tts.speech import graphs
from csm_tts.speech.engine import CsmEngine
from csm_tts.speech.graphs import FrameGraphs, GraphCaptureFailed, parse_mode
from csm_tts.speech.request import GenerationRequest

REQUEST = GenerationRequest("Graphs or not.", temperature=0, max_audio_length_ms=480)


def audio(engine: CsmEngine) -> np.ndarray:
    return np.concatenate([c.audio for c in engine.generate(REQUEST)])


class FakeGraph:
    """What a capture would give: `replay` runs the captured frame (and, to fake a broken graph, corrupts it)."""

    def __init__(self, run, engine: CsmEngine, corrupt: bool):
        self.run, self.engine, self.corrupt, self.replays = run, engine, corrupt, 0

    def replay(self):
        self.replays += 1
        self.run()
        if self.corrupt:
            self.engine._state.codes.add_(1).remainder_(self.engine.codebook_size)


@pytest.fixture
def pretend_cuda(monkeypatch):
    """The policy believes the device can capture; the real capture then fails on the CPU."""
    monkeypatch.setattr(graphs, "cuda_capable", lambda device: True)


@pytest.fixture
def eager(engine):
    return CsmEngine(engine.model, engine.processor, max_streams=2, cuda_graphs="off")


def test_modes_parse_and_a_cpu_never_captures(engine):
    assert [parse_mode(v) for v in (None, True, False, "AUTO", " off ")] == ["auto", "on", "off", "auto", "off"]
    with pytest.raises(ValueError, match="auto, on, off"):
        parse_mode("sometimes")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        CsmEngine(engine.model, engine.processor, cuda_graphs="on")
    auto = CsmEngine(engine.model, engine.processor, max_streams=2)
    assert not auto.cuda_graphs and "frames run eagerly" in auto.load_graphs() and auto.graphs.fallback is None


def test_auto_falls_back_to_eager_frames_when_capture_fails(engine, eager, pretend_cuda):
    auto = CsmEngine(engine.model, engine.processor, max_streams=2, cuda_graphs="auto")
    assert auto.cuda_graphs  # it means to capture
    summary = auto.load_graphs()
    assert "CUDA GRAPHS DISABLED" in summary and "capture failed" in summary
    assert not auto.cuda_graphs and auto.graphs.fallback and not auto.graphs.graphs
    assert np.array_equal(audio(auto), audio(eager))  # and it serves


def test_on_fails_the_load_when_capture_fails(engine, pretend_cuda):
    strict = CsmEngine(engine.model, engine.processor, max_streams=2, cuda_graphs="on")
    with pytest.raises(GraphCaptureFailed, match="cuda_graphs=on: capture failed"):
        strict.capture_graphs()


@pytest.mark.parametrize("corrupt", [False, True], ids=["faithful", "mismatch"])
def test_a_probe_replay_is_checked_against_the_eager_step(engine, eager, pretend_cuda, monkeypatch, corrupt):
    made = []
    auto = CsmEngine(engine.model, engine.processor, max_streams=2, cuda_graphs="auto")

    def capture(device, run, pool):
        made.append(FakeGraph(run, auto, corrupt))
        return made[-1]

    monkeypatch.setattr(graphs, "capture_frame", capture)
    summary = auto.load_graphs(max_window=256)
    if corrupt:
        assert "CUDA GRAPHS DISABLED" in summary and "codes differently" in summary
        assert not auto.cuda_graphs and "codes differently" in auto.graphs.fallback
    else:
        assert "probe replay equals the eager step" in summary and auto.cuda_graphs
        assert len(auto.graphs.graphs) == len(auto.batch_sizes) * len(auto.topk_bounds)
    before = sum(g.replays for g in made)
    assert np.array_equal(audio(auto), audio(eager))
    assert (sum(g.replays for g in made) > before) == (not corrupt)  # frames replay the graphs only when trusted


def test_frame_graphs_policy_without_an_engine():
    calls = []
    policy = FrameGraphs("auto", torch.device("cuda"))  # no CUDA needed: nothing is captured here
    summary = policy.load([(1, 256, 64)], capture=calls.append, check=lambda: "replay differs")
    assert calls == [(1, 256, 64)] and not policy.enabled and policy.fallback == "replay differs"
    assert "DISABLED" in summary
    strict = FrameGraphs("on", torch.device("cuda"))
    with pytest.raises(GraphCaptureFailed, match="replay differs"):
        strict.load([], capture=calls.append, check=lambda: "replay differs")
    assert "eagerly" in FrameGraphs("off", torch.device("cuda")).load([(1, 256, 64)], calls.append, lambda: None)
