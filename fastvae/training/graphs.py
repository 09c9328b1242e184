"""A training step captured once as a CUDA graph and replayed (``TrainConfig(cuda_graphs=True)``).

``GraphedStep`` runs a step function that reads only static tensors (inputs the caller fills in
place before each step) and returns one static output tensor. On CUDA it follows torch's
"whole-network capture" recipe (the CUDA Graphs notes of torch.cuda): a few warm-up calls on a
side stream, the parameters' ``.grad`` set to None so that the captured backward allocates them
from the graph's private pool, one capture with ``torch.cuda.graph``, then ``replay()`` per
step: the same kernels on the same memory, so the output and every ``.grad`` are overwritten in
place, with none of the host work (Python, autograd, launches) of an eager step.

The random numbers stay a fresh draw per step: the fused ops draw their Philox key with
``torch.randint`` on the device (a device tensor, never a Python int), and torch's graph-safe
generator gives each replay the generator's current offset and advances it by the capture's
total, as the eager step would have. Warm-up and capture run under ``torch.random.fork_rng``:
they consume none of the run's random numbers, so the first replay draws what the first eager
step would have.

With ``emulate=True`` (how the tests drive it on the CPU) the same object re-runs the step
function eagerly at each replay and copies its results into the static output and gradients
captured the first time: every piece of the plumbing (static inputs filled in place, outputs and
gradients read from fixed tensors, gradients reinstalled) runs as on a GPU, and only the replay
itself is eager.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


class GraphCaptureError(RuntimeError):
    """The step could not be captured as a CUDA graph (an operation inside it that a capture
    does not allow: a host sync, a CPU-GPU copy, an allocation outside torch's allocator)."""


# Warm-up calls before the capture (torch's recipe uses 3; DistributedDataParallel would need 11,
# but the trainer refuses graphs under DDP).
WARMUP_STEPS = 3


class GraphedStep:
    """``fn()``: a step (forward, loss, backward, and whatever device-side checks) that reads only
    static tensors and returns one tensor; ``params``: the parameters whose ``.grad`` it writes.

    ``replay()`` runs one step and returns the static output (the same tensor every time,
    overwritten). The first call warms up and captures (``WARMUP_STEPS`` calls of ``fn`` on the
    inputs as they are, then the capture); every call then replays the graph. Before each
    replay every parameter's ``.grad`` is set back to the static gradient the graph writes, so
    that an eager step in between (a batch of another shape), which sets fresh ``.grad``
    tensors, or ``zero_grad(set_to_none=True)``, does no harm. ``fn`` must not read Python
    values that change between steps: they would be baked into the graph.

    ``buffers``: tensors ``fn`` updates in place (a BatchNorm's running statistics), put back
    as they were after the warm-up and the capture, so that only the replays update them.
    ``device``: a CUDA device, or any device with ``emulate=True`` (replay re-runs ``fn``
    eagerly, see the module's docstring). Raises ``ValueError`` for a non-CUDA device without
    ``emulate``; ``GraphCaptureError`` (at the first ``replay``) when the warm-up ran but the
    capture failed.
    """

    def __init__(self, fn: Callable[[], Tensor], params: Sequence[nn.Parameter],
                 device: torch.device | str, *, buffers: Sequence[Tensor] = (),
                 emulate: bool = False, warmup: int = WARMUP_STEPS) -> None:
        device = torch.device(device)
        if device.type != "cuda" and not emulate:
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.fn, self.params, self.device = fn, list(params), device
        self.buffers = list(buffers)
        self.emulate, self.warmup = emulate, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: Tensor | None = None
        self.grads: list[Tensor | None] = []

    def replay(self) -> Tensor:
        if self.output is None:
            self._capture()
        for p, g in zip(self.params, self.grads, strict=True):
            if p.grad is not g:
                p.grad = g
        if self.graph is not None:
            self.graph.replay()
        else:
            self._rerun()
        assert self.output is not None
        return self.output

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _capture(self) -> None:
        cuda = not self.emulate
        kept = [b.clone() for b in self.buffers]
        # warm-up and capture consume none of the run's random numbers
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            with self._side_stream() if cuda else contextlib.nullcontext():
                for _ in range(self.warmup):
                    self._clear_grads()
                    self.fn()
            # None before the capture: the captured backward allocates each .grad from the
            # graph's pool, and every replay writes it in place
            self._clear_grads()
            try:
                if cuda:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        output = self.fn()
                    self.graph = graph
                else:
                    output = self.fn()
            except Exception as e:  # the warm-up ran the same step: the capture broke it
                first = (str(e).strip().splitlines() or [""])[0]
                raise GraphCaptureError(f"capturing the training step as a CUDA graph failed "
                                        f"({type(e).__name__}: {first}); train without CUDA "
                                        "graphs") from e
        with torch.no_grad():
            for b, k in zip(self.buffers, kept, strict=True):
                b.copy_(k)
        self.output = output
        self.grads = [p.grad for p in self.params]

    @contextlib.contextmanager
    def _side_stream(self):
        """torch's recipe: warm up on a side stream that waits for the current one, and make
        the current one wait for it after."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            yield
        current.wait_stream(side)

    def _rerun(self) -> None:
        """The emulated replay, doing to memory what a graph replay does: ``fn``'s results
        written into the static output and gradients, each parameter's ``.grad`` attribute left
        as it was (a graph writes memory, it assigns no attribute)."""
        assert self.output is not None
        before = [p.grad for p in self.params]
        self._clear_grads()
        output = self.fn()
        with torch.no_grad():
            self.output.copy_(output)
            for p, g, grad in zip(self.params, self.grads, before, strict=True):
                if g is not None:
                    if p.grad is None:
                        raise RuntimeError("the step wrote no gradient for a parameter whose "
                                           "captured step did")
                    g.copy_(p.grad)
                p.grad = grad
