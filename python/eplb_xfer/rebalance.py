"""``rearrange_expert_weights_inplace``: plan -> transfer -> commit, per layer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ._tensors import check_int, expert_bytes, to_indices, validate_weights
from .communicator import EplbCommunicator
from .errors import TransferError, TransferInterrupted
from .planning import TransferPlan, plan_rebalance
from .torch_dist import TorchCommunicator

log = logging.getLogger("eplb_xfer")


@dataclass
class RebalanceStats:
    """What one rebalance did on this rank.

    Attributes:
        layers: layers in the placement (committed, whether or not they moved).
        experts_received: expert rows received from peers (one per missing expert).
        bytes_received: bytes received from peers.
        bytes_copied_locally: bytes of local copies and duplicate fills.
        seconds: wall time of the whole call on this rank.
        per_peer_bytes: bytes received from each source rank.
        staging_bytes: the communicator's extra memory (0 for NIXL zero-copy).
        backend: communicator class name.
        layer_seconds: wall time of each layer on this rank (0.0 for a layer
            nobody changes).
        gbps: ``bytes_received / seconds`` in GB/s (property).
    """

    layers: int = 0
    experts_received: int = 0
    bytes_received: int = 0
    bytes_copied_locally: int = 0
    seconds: float = 0.0
    per_peer_bytes: dict[int, int] = field(default_factory=dict)
    staging_bytes: int = 0
    backend: str = ""
    layer_seconds: list[float] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        """Received bytes per second, in GB/s (1e9)."""
        return self.bytes_received / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["gbps"] = self.gbps
        return d


def apply_rank_mapping(
    old: np.ndarray, new: np.ndarray, rank_mapping: Mapping[int, int], world: int
) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's elastic-EP ``rank_mapping`` (old rank -> new rank, -1 = leaves).

    Scale down (``len(rank_mapping) == world``, the old group): ``new`` is
    widened to the old width; old rank r gets new rank ``rank_mapping[r]``'s
    block, leaving ranks get -1 (they keep their rows and only send).
    Scale up (``len(rank_mapping) < world``, the new group): ``old`` is
    widened; old rank r's block moves to ``rank_mapping[r]``, new ranks hold
    nothing (-1).
    """
    if not isinstance(rank_mapping, Mapping):
        raise TypeError(
            f"rank_mapping: expected a dict old rank -> new rank, got {type(rank_mapping).__name__}"
        )
    items = {
        check_int(k, "rank_mapping key", 0): check_int(v, "rank_mapping value", -1)
        for k, v in rank_mapping.items()
    }
    n_old = len(items)
    if sorted(items) != list(range(n_old)):
        raise ValueError(f"rank_mapping: keys must be 0..{n_old - 1}, got {sorted(items)}")
    targets = [v for v in items.values() if v >= 0]
    if len(set(targets)) != len(targets):
        raise ValueError(f"rank_mapping: two old ranks map to one new rank: {items}")
    num_layers = old.shape[0]
    if n_old == world:  # scale down (or a relabeling): widen new
        n_new = len(targets)
        if sorted(targets) != list(range(n_new)):
            raise ValueError(f"rank_mapping: new ranks must be 0..{n_new - 1}, got {items}")
        if n_new == 0 or new.shape[1] % n_new:
            raise ValueError(
                f"new_indices: {new.shape[1]} slots do not split over {n_new} remaining ranks"
            )
        n_local = new.shape[1] // n_new
        wide = np.full((num_layers, world * n_local), -1, dtype=np.int64)
        for r, t in items.items():
            if t >= 0:
                wide[:, r * n_local : (r + 1) * n_local] = new[:, t * n_local : (t + 1) * n_local]
        return old, wide
    if n_old > world:
        raise ValueError(f"rank_mapping: {n_old} old ranks for a group of {world}")
    if any(t >= world for t in targets):
        raise ValueError(f"rank_mapping: new ranks must be below {world}, got {items}")
    if old.shape[1] % n_old:
        raise ValueError(f"old_indices: {old.shape[1]} slots do not split over {n_old} old ranks")
    n_local = old.shape[1] // n_old
    wide = np.full((num_layers, world * n_local), -1, dtype=np.int64)
    for r, t in items.items():
        if t >= 0:
            wide[:, t * n_local : (t + 1) * n_local] = old[:, r * n_local : (r + 1) * n_local]
    return wide, new


def rearrange_expert_weights_inplace(
    old_indices: object,
    new_indices: object,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    expert_buffer: Sequence[torch.Tensor],
    group: dist.ProcessGroup | None,
    communicator: EplbCommunicator | None = None,
    *,
    node_of_rank: Sequence[int] | None = None,
    on_layer: Callable[[int], None] | None = None,
    stream: Any = None,
    rank_mapping: Mapping[int, int] | None = None,
) -> RebalanceStats:
    """Moves expert rows so that every slot holds ``new_indices``' expert.

    Per layer: rows this rank already holds are copied into ``expert_buffer``;
    missing experts are received once (deduplicated) into the buffer; once
    every rank has finished the layer, duplicates are filled and changed rows
    committed from the buffer. Unchanged slots and ``-1`` slots are untouched.
    Call it on every rank of ``group`` with the same placements (ranks that
    disagree all raise :class:`TransferError` before any row changes).

    Args:
        old_indices, new_indices: int ``[L, P]`` (torch.Tensor or np.ndarray).
        expert_weights: per layer, the stacked tensors ``[n_local, ...]``.
        expert_buffer: one layer's worth of tensors like ``expert_weights[0]``.
        group: the EP process group (None = default group).
        communicator: how bytes move; None = a TorchCommunicator on ``group``.
        node_of_rank: node id per rank; same-node sources are preferred.
            Default: what the communicator learned at set-up.
        on_layer: called with each committed layer index (progress reporting).
        stream: CUDA stream for this call's torch work (default: the current
            stream); data moves only after work queued there has run.
        rank_mapping: vLLM's elastic-EP mapping (see :func:`apply_rank_mapping`).

    Raises:
        TypeError / ValueError before anything moves, on bad input;
        RuntimeError if ``communicator`` was closed, failed before, or is in
        use by another thread (one rebalance at a time).
        TransferError if a peer fails: every surviving rank raises it with the
        same ``peer``, ``layer`` and ``committed_layers``; layers in
        ``committed_layers`` were applied everywhere, no other layer changed.
        TransferInterrupted (a KeyboardInterrupt) on Ctrl-C, after the ranks
        agreed on the outcome.
    """
    t0 = time.perf_counter()
    if communicator is not None and not isinstance(communicator, EplbCommunicator):
        raise TypeError(
            f"communicator: expected an EplbCommunicator or None, got {type(communicator).__name__}"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a ProcessGroup or None, got {type(group).__name__}")
    if on_layer is not None and not callable(on_layer):
        raise TypeError(f"on_layer: expected a callable, got {type(on_layer).__name__}")
    old = to_indices(old_indices, "old_indices")
    new = to_indices(new_indices, "new_indices")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank_mapping is not None:
        old, new = apply_rank_mapping(old, new, rank_mapping, world)
    if old.shape != new.shape:
        raise ValueError(
            f"new_indices: shape {tuple(new.shape)} differs from old_indices {tuple(old.shape)}"
        )
    num_layers, num_slots = old.shape
    if num_slots % world != 0:
        raise ValueError(f"old_indices: {num_slots} slots do not split over {world} ranks")
    n_local = num_slots // world
    validate_weights(expert_weights, expert_buffer, n_local)
    if len(expert_weights) != num_layers:
        raise ValueError(
            f"expert_weights: has {len(expert_weights)} layers, old_indices has {num_layers}"
        )
    owned = communicator is None
    comm = communicator if communicator is not None else TorchCommunicator(group)
    try:
        comm.acquire("rebalance")
    except BaseException:
        if owned:
            comm.close()
        raise
    previous_stream = comm._stream
    try:
        comm.check_tensors(expert_weights, expert_buffer)
        if stream is not None:
            comm.set_stream(stream)
        nodes = node_of_rank if node_of_rank is not None else getattr(comm, "node_of_rank", None)
        plan = plan_rebalance(old, new, world, node_of_rank=nodes)
        return _run(plan, old, expert_weights, expert_buffer, comm, rank, on_layer, t0)
    finally:
        comm._stream = previous_stream
        comm.release()
        if owned:
            comm.close()


def _run(
    plan: TransferPlan,
    old: np.ndarray,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    expert_buffer: Sequence[torch.Tensor],
    comm: EplbCommunicator,
    rank: int,
    on_layer: Callable[[int], None] | None,
    t0: float,
) -> RebalanceStats:
    num_layers = plan.num_layers
    row_bytes = expert_bytes(expert_buffer)
    stats = RebalanceStats(backend=type(comm).__name__, staging_bytes=comm.staging_bytes)
    committed: list[int] = []
    moving = plan.moving_layers()  # per layer one call into the core: the layer itself
    local_rows = plan.local_rows(rank)
    try:
        comm.begin_rebalance(plan)
        for layer in range(num_layers):
            t_layer = time.perf_counter()
            if not moving[layer]:  # every rank agrees: nothing moves anywhere
                committed.append(layer)
                stats.layer_seconds.append(0.0)
                if on_layer is not None:
                    on_layer(layer)
                continue
            outcome = comm.rebalance_layer(
                plan, layer, expert_weights[layer], expert_buffer, old[layer]
            )
            committed.append(layer)
            stats.layer_seconds.append(time.perf_counter() - t_layer)
            n_recv = sum(outcome.rows_per_peer.values())
            stats.experts_received += n_recv
            stats.bytes_received += n_recv * row_bytes
            stats.bytes_copied_locally += local_rows[layer] * row_bytes
            for p, n in outcome.rows_per_peer.items():
                stats.per_peer_bytes[p] = stats.per_peer_bytes.get(p, 0) + n * row_bytes
            if on_layer is not None:
                on_layer(layer)
        comm.end_rebalance(num_layers)
    except TransferError as e:
        raise TransferError(
            str(e),
            peer=e.peer,
            layer=e.layer if e.layer >= 0 else len(committed),
            committed_layers=committed,
            blame=e.blame,
        ) from e
    except TransferInterrupted as e:
        if e.layer > len(committed) and len(committed) < num_layers:
            committed.append(len(committed))  # settled and committed before raising
        raise TransferInterrupted(str(e), layer=len(committed), committed_layers=committed) from e
    stats.layers = num_layers
    stats.seconds = time.perf_counter() - t0
    log.debug("rank %d rebalance: %s", rank, stats)
    return stats
