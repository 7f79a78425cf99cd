"""The communicator interface (vLLM-compatible), shared by every backend.

A communicator moves expert rows between ranks for one layer at a time. Two
ways to drive it:

* vLLM's: ``set_transfer_context(old_indices, layer_idx)``, ``add_send`` /
  ``add_recv`` per expert, ``execute()``; the caller copies the buffer into
  the weights afterwards (vLLM's driver does);
* eplb-xfer's: :meth:`EplbCommunicator.rebalance_layer` hands over the Rust
  plan for a whole layer and the communicator moves, copies and commits it
  (fast backends do it without per-expert Python calls).

This module imports no backend.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ._tensors import (
    check_int,
    check_memory,
    copy_rows,
    copy_runs,
    deferred_sigint,
    is_seq,
    stream_context,
    to_indices,
)
from .planning import TransferPlan


@dataclass
class LayerOutcome:
    """What :meth:`EplbCommunicator.rebalance_layer` did on this rank.

    ``rows_per_peer``: expert rows received per source rank. ``pending``: a
    peer failed while this layer still completed everywhere (it was
    committed); the next layer raises. ``interrupted``: Ctrl-C arrived; the
    layer was settled (committed or not, as on every rank) before returning.
    """

    committed: bool = True
    rows_per_peer: dict[int, int] = field(default_factory=dict)
    interrupted: bool = False


class EplbCommunicator(ABC):
    """Moves expert weight rows between EP ranks (vLLM's communicator interface).

    A communicator runs one rebalance at a time: a second thread that calls
    it while another is inside a rebalance or an ``execute()`` gets a
    ``RuntimeError`` at once (it does not wait).
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group: expected a ProcessGroup or None, got {type(group).__name__}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._ctx_old: np.ndarray | None = None
        self._ctx_layer: int | None = None
        self._closed = False
        self._stream: Any = None
        self._owner = threading.Lock()

    def _check_open(self, what: str) -> None:
        """Raises ``RuntimeError`` once :meth:`close` was called."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed: cannot {what}; create a new one")

    def acquire(self, what: str) -> None:
        """Marks this communicator busy; ``RuntimeError`` if another thread is in a
        rebalance on it. Pair with :meth:`release`."""
        if not self._owner.acquire(blocking=False):
            raise RuntimeError(
                f"cannot {what}: another thread is using this {type(self).__name__} "
                "(one rebalance at a time per communicator)"
            )

    def release(self) -> None:
        self._owner.release()

    # -- vLLM-compatible interface -------------------------------------------------
    def set_transfer_context(
        self, old_indices: Any, layer_idx: int, perf_context: object = None
    ) -> None:
        """Sets the placement (``[P]`` row of one layer, or full ``[L, P]``)
        and layer that the next ``execute()`` refers to. ``perf_context`` is
        accepted and ignored (a proposed vLLM extension)."""
        self._check_open("set_transfer_context")
        layer = check_int(layer_idx, "layer_idx", 0, self.num_layers_or_none())
        row = layer_row(old_indices, layer)
        want = self.num_slots_or_none()
        if want is not None and row.shape[0] != want:
            raise ValueError(
                f"old_indices: expected {want} slots ({self.world_size} ranks), got shape "
                f"{tuple(row.shape)}"
            )
        self._ctx_old = row
        self._ctx_layer = layer

    def num_layers_or_none(self) -> int | None:
        """Layers this communicator knows (bound tensors), if any."""
        return None

    def num_slots_or_none(self) -> int | None:
        """Physical slots of a placement row, if known."""
        return None

    def set_stream(self, stream: Any) -> None:
        """Runs this communicator's torch work on ``stream`` (a CUDA stream;
        ``None`` = the caller's current stream). Data is moved only once
        work queued on that stream has run (an event, not a device sync)."""
        if stream is not None and not (
            torch.cuda.is_available() and isinstance(stream, torch.cuda.Stream)
        ):
            raise TypeError(f"stream: expected a torch.cuda.Stream or None, got {stream!r}")
        self._stream = stream

    @property
    def needs_profile_buffer_reservation(self) -> bool:
        """Whether vLLM must reserve memory for this communicator in its profile
        run (it allocates at transfer time). False: nothing is allocated then."""
        return False

    @abstractmethod
    def add_send(self, tensors: Sequence[torch.Tensor], dst_rank: int, expert_id: int) -> None:
        """Queues one expert's rows (one per weight tensor) for ``dst_rank``."""

    @abstractmethod
    def add_recv(self, tensors: Sequence[torch.Tensor], src_rank: int, expert_id: int) -> None:
        """Queues receiving one expert from ``src_rank`` into ``tensors``."""

    @abstractmethod
    def execute(self, old_indices: Any = None) -> None:
        """Moves everything queued, then clears the queues. Returns once this
        rank's receives landed and every peer finished reading its rows."""

    def close(self) -> None:
        """Releases resources (idempotent); later calls raise ``RuntimeError``."""
        self._closed = True

    def begin_rebalance(self, plan: TransferPlan) -> None:  # noqa: B027 - optional hook
        """Called by the driver before the first layer of a rebalance. Backends
        that can check that every rank has the same plan do it here."""

    def end_rebalance(self, num_layers: int) -> None:  # noqa: B027 - optional hook
        """Called by the driver after the last layer of a rebalance. Backends
        that detect failed peers confirm here that every rank finished."""

    @property
    def staging_bytes(self) -> int:
        """Bytes this communicator allocated beyond the caller's tensors."""
        return 0

    # -- eplb-xfer's way ------------------------------------------------------------
    def check_tensors(
        self,
        expert_weights: Sequence[Sequence[torch.Tensor]],
        expert_buffer: Sequence[torch.Tensor],
    ) -> None:
        """Raises ``ValueError`` if this communicator cannot move these tensors
        (called by the driver before anything moves): the default checks their
        memory (contiguous rows, no two rows sharing bytes)."""
        self._check_open("rebalance")
        check_memory(expert_weights, expert_buffer)

    def rebalance_layer(
        self,
        plan: TransferPlan,
        layer_idx: int,
        weights: Sequence[torch.Tensor],
        buffer: Sequence[torch.Tensor],
        old_layer: np.ndarray,
    ) -> LayerOutcome:
        """Moves, copies and commits one planned layer on this rank.

        Local copies into ``buffer``, the exchange, duplicate fills, then the
        changed rows ``buffer -> weights``. The default goes through the
        vLLM-style calls; backends override it.
        """
        self._check_open("rebalance_layer")
        rank = self.rank
        with stream_context(self._stream):
            copy_rows(buffer, weights, [(s, d) for _e, s, d in plan.local_copies(layer_idx, rank)])
        self.set_transfer_context(old_layer, layer_idx)
        for expert, src_row, readers in plan.sends(layer_idx, rank):
            rows = [w[src_row] for w in weights]
            for r in readers:
                self.add_send(rows, r, expert)
        per_peer: dict[int, int] = {}
        for expert, src_rank, _src_row, dst_row in plan.recvs(layer_idx, rank):
            self.add_recv([b[dst_row] for b in buffer], src_rank, expert)
            per_peer[src_rank] = per_peer.get(src_rank, 0) + 1
        self.execute()
        with deferred_sigint(), stream_context(self._stream):
            dups = [(s, d) for _e, s, d in plan.dup_fills(layer_idx, rank)]
            copy_rows(buffer, buffer, dups)
            copy_runs(weights, buffer, plan.changed_runs(layer_idx, rank))
        return LayerOutcome(rows_per_peer=per_peer)

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
    return check_int(value, name, 0, world_size)


def check_node_of_rank(node_of_rank: Sequence[Any], world_size: int) -> list[int]:
    """A node id per rank (the ``node_of_rank`` option of the communicators)."""
    nodes = [check_rank(n, "node_of_rank", 1 << 31) for n in node_of_rank]
    if len(nodes) != world_size:
        raise ValueError(f"node_of_rank: {len(nodes)} entries for {world_size} ranks")
    return nodes


def check_expert(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"expert_id: expected an int, got {type(value).__name__}")
    v = int(value)
    if not 0 <= v <= np.iinfo(np.int64).max:
        raise ValueError(f"expert_id: expected a non-negative int64, got {value!r}")
    return v


def check_row_tensors(
    tensors: Any, name: str, row_bytes: Sequence[int], *, receive: bool
) -> list[torch.Tensor]:
    """One contiguous row per weight tensor, of the right sizes."""
    if not is_seq(tensors):
        raise TypeError(f"{name}: expected a list of tensors, got {type(tensors).__name__}")
    ts = list(tensors)
    if len(ts) != len(row_bytes):
        raise ValueError(
            f"{name}: expected {len(row_bytes)} tensors (one row per weight tensor), got {len(ts)}"
        )
    for i, (t, nb) in enumerate(zip(ts, row_bytes)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        if t.device.type == "meta":
            raise ValueError(f"{name}[{i}]: a meta tensor has no memory to move")
        if t.numel() * t.element_size() != nb or not t.is_contiguous():
            raise ValueError(
                f"{name}[{i}]: expected a contiguous row of {nb} bytes, got "
                f"{t.numel() * t.element_size()} bytes (contiguous={t.is_contiguous()})"
            )
        if receive and t.requires_grad:
            raise ValueError(f"{name}[{i}]: requires_grad=True; receive targets must not need grad")
    return ts
