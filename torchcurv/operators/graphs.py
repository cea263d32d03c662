"""Each batch's product recorded once as a CUDA graph and replayed (``cuda_graphs=True``).

A curvature product of a small or medium model on a GPU is bound by the host: every
one of the thousand-odd operators of a double backward is dispatched and launched from
Python and C++ while the GPU waits. A CUDA graph records the kernels of one batch's
product once and replays them with one launch, so the product costs what the GPU
needs. What a replay reads is fixed at recording: the addresses of the parameters, of
the batch and of the vectors. So:

- the vectors are copied into one static buffer per block width, and a batch whose
  tensors are not the recorded ones is copied into the recorded batch (same shapes and
  dtypes, checked by the walk over the data); non-tensor parts of a batch and the batch's
  weight must be the recorded ones, or the batch is recorded again;
- parameters are read where they live: values changed in place are seen by the next
  replay, a parameter given new storage (``p.data = ...``) makes every graph be recorded
  again (checked per product);
- the model's Python code runs only while recording: a forward that would take another
  path later (hooks added, a mode switched, a data-dependent branch) needs a new
  operator. Host synchronisations inside the forward or the loss cannot be recorded and
  raise when recording.

Recording one batch costs three products (two warm-up runs on a side stream, as CUDA
graphs need, then the capture and its first replay); the graphs of one operator share
one memory pool, replayed in the order they were recorded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from torchcurv.operators.base import ParameterBlock

if TYPE_CHECKING:
    from torchcurv.operators.curvature import CurvatureOperator

Batch = Any
BatchProduct = Callable[[Batch, "torch.Tensor | float", ParameterBlock],
                        tuple[torch.Tensor, list[torch.Tensor]]]


class _Recorded:
    """One batch position's graph: its static batch, weight, and outputs."""

    def __init__(self, batch: Batch, scale: torch.Tensor | float) -> None:
        leaves, self.spec = tree_flatten(batch)
        self.tensors = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        self.static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        self.scale = scale
        self.graph = torch.cuda.CUDAGraph()
        self.loss: torch.Tensor | None = None
        self.out: list[torch.Tensor] = []

    def batch(self) -> Batch:
        return tree_unflatten(self.static, self.spec)

    def accepts(self, batch: Batch, scale: torch.Tensor | float) -> list[Any] | None:
        """The batch's leaves if this graph can replay it, else ``None``."""
        if isinstance(scale, torch.Tensor) or scale != self.scale:
            return None
        leaves, spec = tree_flatten(batch)
        if spec != self.spec:
            return None
        for x, s in zip(leaves, self.static):
            if isinstance(s, torch.Tensor):
                if not isinstance(x, torch.Tensor) or x.shape != s.shape or x.dtype != s.dtype \
                        or x.device != s.device:
                    return None
            elif x != s:
                return None
        return leaves

    def load(self, leaves: list[Any]) -> None:
        for i in self.tensors:
            x, s = leaves[i], self.static[i]
            if x.data_ptr() != s.data_ptr():
                s.copy_(x)


class CudaGraphs:
    """The recorded batch products of one operator (see the module's docstring).

    Not thread-safe by design: one operator's products replay one at a time (the walk
    holds ``lock``).
    """

    def __init__(self, op: CurvatureOperator) -> None:
        if op.device.type != "cuda":
            raise ValueError(
                f"cuda_graphs=True records CUDA graphs; the operator is on {op.device}")
        self._op = op
        self._pool = torch.cuda.graph_pool_handle()
        self._entries: dict[tuple[int, int], _Recorded] = {}
        self._vectors: dict[int, tuple[torch.Tensor, ParameterBlock]] = {}
        self._addresses: list[int] = []
        self.lock = threading.Lock()

    def start(self, V: torch.Tensor) -> ParameterBlock:
        """Begin a product of the block ``V``: its vectors copied into the static buffer
        of its width (the blocks the recorded graphs read), and all graphs dropped if a
        parameter moved."""
        addresses = [p.data_ptr() for p in self._op.params]
        if addresses != self._addresses:
            self._entries.clear()
            self._addresses = addresses
        m = V.shape[1]
        if m not in self._vectors:
            static = torch.empty(V.shape, dtype=V.dtype, device=V.device)
            blocks = self._op._split_block(static)
            if m == 1:
                blocks.vectors  # noqa: B018 - made now, so that graphs record the views
            self._vectors[m] = (static, blocks)
        static, blocks = self._vectors[m]
        static.copy_(V)
        return blocks

    def run(self, position: int, batch: Batch, scale: torch.Tensor | float,
            blocks: ParameterBlock, product: BatchProduct) -> tuple[torch.Tensor,
                                                                    list[torch.Tensor]]:
        """The batch's product by replaying its graph (recording it first if needed).

        The loss comes back as a copy (the graph's own output is overwritten by the next
        replay); the products are the graph's outputs, valid until the next replay."""
        key = (position, blocks[0].shape[0])
        entry = self._entries.get(key)
        leaves = entry.accepts(batch, scale) if entry is not None else None
        if entry is None or leaves is None:
            entry = self._record(key, batch, scale, blocks, product)
            leaves = tree_flatten(batch)[0]
        entry.load(leaves)
        entry.graph.replay()
        assert entry.loss is not None
        return entry.loss.clone(), entry.out

    def _record(self, key: tuple[int, int], batch: Batch, scale: torch.Tensor | float,
                blocks: ParameterBlock, product: BatchProduct) -> _Recorded:
        if isinstance(scale, torch.Tensor):
            raise ValueError(
                "cuda_graphs=True needs the batches' weights known at construction "
                "(check_deterministic=True, or a 'sum' objective)")
        entry = _Recorded(batch, scale)
        static_batch = entry.batch()
        side = torch.cuda.Stream(device=self._op.device)
        side.wait_stream(torch.cuda.current_stream(self._op.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                product(static_batch, scale, blocks)
        torch.cuda.current_stream(self._op.device).wait_stream(side)
        try:
            with torch.cuda.graph(entry.graph, pool=self._pool):
                loss, out = product(static_batch, scale, blocks)
        except RuntimeError as exc:
            raise RuntimeError(
                f"cuda_graphs=True could not record batch {key[0]}'s product ({exc}); the "
                "model or the loss synchronises with the host or copies host tensors to "
                "the device on every call (HuggingFace's eager attention does), which a "
                "CUDA graph cannot hold. Build the operator with cuda_graphs=False") from exc
        entry.loss, entry.out = loss.detach(), list(out)
        self._entries[key] = entry
        return entry
