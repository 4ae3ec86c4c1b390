"""CUDA graphs of the frame step, with a safety net.

A frame step is hundreds of small kernels; on a GPU the engine captures it once per static shape (batch rows, context
window, top-k bound) and replays it. A capture can fail (a driver, a library, a kernel that synchronises) or replay
something other than the eager step, so `cuda_graphs` is a policy:

- `off`: never capture; every frame runs eagerly.
- `on`: capture at load and check one replay against the eager step on a probe batch; any failure fails the load.
- `auto` (the default): the same on a CUDA device (nothing on a CPU, which cannot capture), but a capture error or a
  mismatch makes the engine serve eagerly, with a loud log line and `fallback` set for a metric.

The policy needs no CUDA: capturing goes through `capture_frame`, and `cuda_capable` says whether a device can
capture; tests replace either to make capture fail on a CPU. Graphs are captured and replayed under the engine's
lock; they share one memory pool because they never run at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MODES = ("auto", "on", "off")
Shape = tuple[int, int, int]  # batch rows, context window, top-k bound


class GraphCaptureFailed(RuntimeError):
    """cuda_graphs=on and a capture failed or its replay differs from the eager step."""


def parse_mode(value: str | bool | None) -> str:
    """`auto|on|off`; True/False/None (the engine's older spelling) mean on/off/auto."""
    if value is None or isinstance(value, bool):
        return {None: "auto", True: "on", False: "off"}[value]
    mode = str(value).strip().lower()
    if mode not in MODES:
        raise ValueError(f"cuda_graphs must be one of {', '.join(MODES)}, got {value!r}")
    return mode


def cuda_capable(device: torch.device) -> bool:
    return device.type == "cuda"


def capture_frame(device: torch.device, run: Callable[[], None], pool: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """Capture one frame step (`run`) as a CUDA graph in the memory pool `pool()`, after a warm-up run on a side
    stream (library handles, workspaces) as torch's own `make_graphed_callables` does."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool()):
        run()
    return graph


class FrameGraphs:
    """The captured graphs of one engine, by shape, and the policy that decides whether they are used."""

    def __init__(self, mode: str | bool | None, device: torch.device):
        self.mode = parse_mode(mode)
        self.device = device
        if self.mode == "on" and not cuda_capable(device):
            raise ValueError(f"cuda_graphs=on needs a CUDA device, the model is on {device}")
        self.enabled = self.mode != "off" and cuda_capable(device)
        self.fallback: str | None = None  # why `auto` serves eagerly after all
        self.graphs: dict[Shape, torch.cuda.CUDAGraph] = {}
        self._pool = None

    def get(self, shape: Shape, run: Callable[[], None], reset: Callable[[], None]):
        """The graph of `shape` (captured now if new: `reset` first makes the warm-up run change nothing), or None
        when frames run eagerly. Holding the engine's lock."""
        if not self.enabled:
            return None
        graph = self.graphs.get(shape)
        if graph is None:
            reset()
            graph = self.graphs[shape] = capture_frame(self.device, run, self._memory_pool)
        return graph

    def _memory_pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def load(self, shapes: list[Shape], capture: Callable[[Shape], object], check: Callable[[], str | None]) -> str:
        """At model load: capture every shape, then `check` one replay against the eager step (it returns what
        differs, or None). Returns a sentence for the log. `on` raises GraphCaptureFailed on any failure; `auto`
        falls back to eager frames (`fallback` says why)."""
        if not self.enabled:
            return f"CUDA graphs {self.mode}: frames run eagerly" + (f" ({self.fallback})" if self.fallback else "")
        try:
            for shape in shapes:
                capture(shape)
            mismatch = check()
        except Exception as e:
            mismatch = f"capture failed: {type(e).__name__}: {e}"
        if mismatch is None:
            return f"CUDA graphs {self.mode}: {len(self.graphs)} captured, a probe replay equals the eager step"
        if self.mode == "on":
            raise GraphCaptureFailed(f"cuda_graphs=on: {mismatch}")
        self.enabled, self.fallback = False, mismatch
        self.graphs.clear()
        self._pool = None
        return f"CUDA GRAPHS DISABLED, serving eager frame steps (slower): {mismatch}"


def probe_frame(state, rows: int, run: Callable[[], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame (`run`: eager or a replay) of `rows` slots on a fixed random batch, every row stepping: its codes and
    hidden states, copied. The slots' lengths and hidden states are restored; only at load, while no stream runs."""
    saved = state.hidden[:rows].clone(), state.lengths[:rows].clone()
    generator = torch.Generator().manual_seed(0)
    state.hidden[:rows] = torch.randn(saved[0].shape, generator=generator).to(state.hidden)
    state.inputs[:rows, :-1] = torch.rand(state.inputs[:rows, :-1].shape, generator=generator).to(state.inputs)
    state.inputs[:rows, -1] = 1
    run()
    result = state.codes[:rows].to("cpu", copy=True), state.hidden[:rows].to("cpu", copy=True)  # copies, not views
    state.hidden[:rows], state.lengths[:rows] = saved
    return result


def compare_probe(eager: tuple[torch.Tensor, torch.Tensor], replayed: tuple[torch.Tensor, torch.Tensor]) -> str | None:
    """What differs between an eager frame and its replay: (codes, hidden) of each. Codes must be equal; hidden
    states may differ in rounding only."""
    (codes, hidden), (codes_r, hidden_r) = eager, replayed
    if not torch.equal(codes, codes_r):
        differ = int((codes != codes_r).sum())
        return f"a probe replay sampled {differ} of {codes.numel()} codes differently from the eager step"
    if not torch.allclose(hidden.float(), hidden_r.float(), rtol=1e-2, atol=1e-2):
        gap = float((hidden.float() - hidden_r.float()).abs().max())
        return f"a probe replay's hidden states differ from the eager step's by up to {gap:.3g}"
    return None
