"""Whole training steps as CUDA graphs: one replay instead of ~100 kernel launches per step.

A step of the default MLP (batch 60) is ~36 MFLOP, microseconds of arithmetic on a GPU; what
costs there is launching its ~100 kernels (forward, backward, optimizer update, the batch
gather) from Python, ~3 ms a step on an H200 (docs/results/bench_sweep_cuda.json), slower
than a laptop's CPU. Captured once into a `torch.cuda.CUDAGraph`, the same kernels replay with
one launch. What makes a step capturable:

- it reads and writes only *static* tensors: the batch is gathered inside the graph from the
  device-resident dataset by a static index tensor that each step fills (`copy_`), and the
  loss lands in a static output;
- no host syncs and no data-dependent Python: nothing in the step may read a device value
  on the host (a `.item()`, `int(tensor)`), since a replay runs no Python at all;
- state created lazily on the first step (torch SGD's momentum buffers, cuBLAS workspaces)
  exists before the capture: the first WARMUP_STEPS steps run eagerly (they are real steps,
  taken on a side stream as torch's capture recipe asks), then the next step is captured and
  every step from it on is a replay.

Which runs qualify (`graph_blocker`): device cuda, no probes (they take extra passes between
steps), SGD (our stacked Adam and torch's default Adam compute bias corrections on the host),
and a norm whose registry entry is capturable (bnexp/nn/registry.py: custom_noisy draws from
its own generators, batch_renorm's r_max/d_max schedule reads its batch count on the host).
`train.cuda_graphs`: auto (capture where it qualifies), on (refuse in one line where it does
not), off. Replays run the captured kernels on the same tensors, so a graphed run computes the
numbers the eager one does (tests/test_graphs.py compares them where a GPU is seen).

On a CPU there is nothing to capture; `GraphedStep(capture=False)` runs the same static-tensor
plumbing eagerly, which is how the tests check it on machines without a GPU.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from bnexp.config import ConfigError
from bnexp.nn.registry import variant

WARMUP_STEPS = 3  # eager steps before the capture: SGD's momentum buffers exist after the first


def graph_blocker(cfg, device: torch.device) -> str | None:
    """Why this run's steps cannot be captured as a CUDA graph; None when they can."""
    if device.type != "cuda":
        return f"device {device.type}: CUDA graphs need a GPU"
    if cfg.probe.every:
        return "probe.every > 0: probe steps take extra forward/backward passes between steps"
    entry = variant(cfg.norm.name)
    if not entry.capturable:
        return f"norm={cfg.norm.name}: {entry.capture_note}"
    if cfg.norm.compile and entry.compile == "fused":
        return "norm.compile=true: torch.compile's kernels are not captured here"
    if cfg.optim.name != "sgd":
        return f"optim={cfg.optim.name}: its bias corrections are computed on the host each step"
    return None


def capture_blocker(cfg, device: torch.device) -> str | None:
    """Why this run's steps will not be captured, train.cuda_graphs=off included; None when they will."""
    return "train.cuda_graphs=off" if cfg.train.cuda_graphs == "off" else graph_blocker(cfg, device)


def use_graphs(cfg, device: torch.device) -> tuple[bool, str]:
    """(capture?, why) for `train.cuda_graphs` (auto | on | off); ConfigError for `on` where a run cannot."""
    blocker = capture_blocker(cfg, device)
    if blocker is None:
        return True, "whole training steps replayed as one CUDA graph"
    if cfg.train.cuda_graphs == "on":
        raise ConfigError(f"train.cuda_graphs=on is not allowed for this run: {blocker} "
                          "(use train.cuda_graphs=auto or off)")
    return False, blocker


class GraphedStep:
    """fn(idx) -> loss, a whole training step on static tensors, run eagerly WARMUP_STEPS times
    and then replayed from one capture.

    Each call copies the batch indices into the static index tensor first, so fn never sees a
    new tensor. The returned loss is the static output: valid until the next call (the loop
    copies it into its losses right away). capture=False runs fn eagerly on the same static
    tensors every time (the CPU stand-in).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], idx_like: Tensor, capture: bool = True,
                 warmup: int = WARMUP_STEPS):
        self.fn, self.capture, self.warmup_left = fn, capture, warmup
        self.idx = torch.empty(idx_like.shape, dtype=idx_like.dtype, device=idx_like.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None
        self.stream = None  # the side stream of the warm-up steps and of the capture (one for both:
        # a library handle created lazily on a stream, e.g. cuBLAS's, then exists before the capture)

    def __call__(self, idx: Tensor) -> Tensor:
        self.idx.copy_(idx)
        if not self.capture:
            return self.fn(self.idx)
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return self._side_stream_step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.out

    def _side_stream_step(self) -> Tensor:
        """An eager step on a side stream (torch's recipe for the steps before a capture)."""
        main = torch.cuda.current_stream()
        side = self.stream = self.stream or torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = self.fn(self.idx)
        main.wait_stream(side)
        out.record_stream(main)  # the loop reads it on the main stream
        return out

    def _capture(self) -> None:
        """Record one step's kernels (nothing runs: the first replay takes this step)."""
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self.out = self.fn(self.idx)
        self.graph = graph
