"""The communicator interface (vLLM-compatible) and its factory.

A communicator moves expert rows between ranks for one layer at a time. Two
ways to drive it:

* vLLM style: ``set_transfer_context(old_indices, layer_idx)``, then
  ``add_send`` / ``add_recv`` per expert, then ``execute()``;
* eplb-xfer style: :meth:`EplbCommunicator.transfer_layer` hands over the Rust
  plan for a whole layer (no per-expert Python calls in fast backends).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ._tensors import to_indices
from .planning import TransferPlan


class EplbCommunicator(ABC):
    """Moves expert weight rows between EP ranks (vLLM's communicator interface)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._ctx_old: np.ndarray | None = None
        self._ctx_layer: int | None = None
        self._closed = False

    def _check_open(self, what: str) -> None:
        """Raises ``RuntimeError`` once :meth:`close` was called."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed: cannot {what}; create a new one")

    # -- vLLM-compatible interface -------------------------------------------------
    def set_transfer_context(self, old_indices: Any, layer_idx: int) -> None:
        """Sets the placement (``[P]`` row of one layer, or full ``[L, P]``) and
        layer that the next ``execute()`` refers to."""
        self._check_open("set_transfer_context")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx: expected a non-negative int, got {layer_idx!r}")
        self._ctx_old = layer_row(old_indices, layer_idx)
        self._ctx_layer = layer_idx

    @abstractmethod
    def add_send(self, tensors: Sequence[torch.Tensor], dst_rank: int, expert_id: int) -> None:
        """Queues one expert's rows (one per weight tensor) for ``dst_rank``."""

    @abstractmethod
    def add_recv(self, tensors: Sequence[torch.Tensor], src_rank: int, expert_id: int) -> None:
        """Queues receiving one expert from ``src_rank`` into ``tensors``."""

    @abstractmethod
    def execute(self, old_indices: Any = None) -> None:
        """Moves everything queued, then clears the queues."""

    def close(self) -> None:
        """Releases resources (idempotent); later calls raise ``RuntimeError``."""
        self._closed = True

    def end_rebalance(self, num_layers: int) -> None:  # noqa: B027 - optional hook
        """Called by the driver after the last layer of a rebalance. Backends
        that can detect failed peers confirm here that every rank finished;
        they raise :class:`TransferError` with ``layer == num_layers`` if not."""

    @property
    def staging_bytes(self) -> int:
        """Bytes this communicator allocated beyond the caller's tensors."""
        return 0

    # -- eplb-xfer fast path ------------------------------------------------------
    def check_tensors(
        self,
        expert_weights: Sequence[Sequence[torch.Tensor]],
        expert_buffer: Sequence[torch.Tensor],
    ) -> None:
        """Raises ``ValueError`` if this communicator cannot move these tensors.

        Called by the driver before anything moves; the default accepts all
        (but raises ``RuntimeError`` after :meth:`close`).
        """
        self._check_open("rebalance")

    def transfer_layer(
        self,
        plan: TransferPlan,
        layer_idx: int,
        weights: Sequence[torch.Tensor],
        buffer: Sequence[torch.Tensor],
        old_layer: np.ndarray,
    ) -> dict[int, int]:
        """Executes this rank's sends and receives of one planned layer.

        Receives land in ``buffer`` rows. Returns rows received per source rank.
        The default goes through the vLLM-style calls; backends override it.
        """
        self._check_open("transfer_layer")
        self.set_transfer_context(old_layer, layer_idx)
        for expert, src_row, readers in plan.sends(layer_idx, self.rank):
            rows = [w[src_row] for w in weights]
            for r in readers:
                self.add_send(rows, r, expert)
        per_peer: dict[int, int] = {}
        for expert, src_rank, _src_row, dst_row in plan.recvs(layer_idx, self.rank):
            self.add_recv([b[dst_row] for b in buffer], src_rank, expert)
            per_peer[src_rank] = per_peer.get(src_rank, 0) + 1
        self.execute(old_layer)
        return per_peer

    def __enter__(self) -> EplbCommunicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def layer_row(old_indices: Any, layer_idx: int | None) -> np.ndarray:
    """One layer's ``[P]`` placement from a ``[P]`` row or a full ``[L, P]``."""
    arr = to_indices(old_indices, "old_indices", ndims=(1, 2))
    if arr.ndim == 1:
        return arr
    if layer_idx is None:
        raise ValueError("old_indices: [L, P] needs set_transfer_context(..., layer_idx)")
    if not 0 <= layer_idx < arr.shape[0]:
        raise ValueError(f"layer_idx: {layer_idx} outside 0..{arr.shape[0] - 1}")
    row: np.ndarray = arr[layer_idx]
    return row


def check_rank(value: Any, name: str, world_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not 0 <= int(value) < world_size:
        raise ValueError(f"{name}: {value} is outside 0..{world_size - 1}")
    return int(value)


def check_expert(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 0:
        raise ValueError(f"expert_id: expected a non-negative int, got {value!r}")
    return int(value)


def create_communicator(
    backend: str,
    group: dist.ProcessGroup | None,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    expert_buffer: Sequence[torch.Tensor],
    **options: Any,
) -> EplbCommunicator:
    """Builds a communicator by name.

    Args:
        backend: ``"nixl"`` (options: ``mode="zero_copy"|"staged"``, ``timeout_s``)
            or ``"torch"`` (torch.distributed P2P: gloo on CPU, NCCL on GPU).
    """
    if backend == "nixl":
        from .nixl import NixlCommunicator

        return NixlCommunicator(group, expert_weights, expert_buffer, **options)
    if backend == "torch":
        from .torch_dist import TorchCommunicator

        if options:
            raise TypeError(f"options: the torch backend takes none, got {sorted(options)}")
        return TorchCommunicator(group)
    raise ValueError(f"backend: expected 'nixl' or 'torch', got {backend!r}")
