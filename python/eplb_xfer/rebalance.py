"""``rearrange_expert_weights_inplace``: plan -> transfer -> commit, per layer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import _core
from ._tensors import (
    copy_rows,
    copy_runs,
    expert_bytes,
    synchronize,
    to_indices,
    validate_weights,
)
from .communicator import EplbCommunicator
from .errors import TransferError
from .planning import plan_rebalance

log = logging.getLogger("eplb_xfer")


@dataclass
class RebalanceStats:
    """What one rebalance did on this rank.

    Attributes:
        layers: layers in the placement (committed, whether or not they moved).
        experts_received: expert rows read from peers (one per missing expert).
        bytes_received: bytes read from peers.
        bytes_copied_locally: bytes of local copies and duplicate fills.
        seconds: wall time of the whole call on this rank.
        per_peer_bytes: bytes read from each source rank.
        staging_bytes: the communicator's extra memory (0 for NIXL zero-copy).
        backend: communicator class name.
        layer_seconds: wall time of each layer on this rank.
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
    #: wall seconds of each layer on this rank (0.0 for a layer nobody changes)
    layer_seconds: list[float] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        """Received bytes per second, in GB/s (1e9)."""
        return self.bytes_received / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["gbps"] = self.gbps
        return d


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
) -> RebalanceStats:
    """Moves expert rows so that every slot holds ``new_indices``' expert.

    Per layer: rows this rank already holds are copied into ``expert_buffer``;
    missing experts are received once (deduplicated) into the buffer; once
    every rank has finished the layer, changed rows are committed from the
    buffer and duplicates filled. Unchanged slots and ``-1`` slots are untouched.

    Args:
        old_indices, new_indices: int ``[L, P]`` (torch.Tensor or np.ndarray).
        expert_weights: per layer, the stacked tensors ``[n_local, ...]``.
        expert_buffer: one layer's worth of tensors like ``expert_weights[0]``.
        group: the EP process group (None = default group).
        communicator: how bytes move; None = a TorchCommunicator on ``group``.
        node_of_rank: optional node id per rank; same-node sources preferred.
            Default: the communicator's ``node_of_rank`` if it has one (a
            NixlCommunicator learns which ranks share a host at set-up).
        on_layer: called with each committed layer index (progress reporting).

    Raises:
        TypeError / ValueError before anything moves, on bad input;
        RuntimeError if ``communicator`` was closed.
        TransferError if a peer fails; layers in ``committed_layers`` were
        applied, no other layer changed. With a NixlCommunicator every
        surviving rank raises it, with the same ``layer`` and
        ``committed_layers``, within about its ``timeout_s`` plus 2 s.
    """
    t0 = time.perf_counter()
    if communicator is not None and not isinstance(communicator, EplbCommunicator):
        raise TypeError(
            f"communicator: expected an EplbCommunicator or None, got {type(communicator).__name__}"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a ProcessGroup or None, got {type(group).__name__}")
    old = to_indices(old_indices, "old_indices")
    new = to_indices(new_indices, "new_indices")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    num_layers, num_slots = old.shape
    if num_slots % world != 0:
        raise ValueError(f"old_indices: {num_slots} slots do not split over {world} ranks")
    n_local = num_slots // world
    _, device = validate_weights(expert_weights, expert_buffer, n_local)  # types first
    if len(expert_weights) != num_layers:
        raise ValueError(
            f"expert_weights: has {len(expert_weights)} layers, old_indices has {num_layers}"
        )
    owned = communicator is None
    comm = communicator
    if comm is None:
        from .torch_dist import TorchCommunicator

        comm = TorchCommunicator(group)
    try:
        comm.check_tensors(expert_weights, expert_buffer)
        if node_of_rank is None:  # a communicator may know the topology (NIXL learns hosts)
            node_of_rank = getattr(comm, "node_of_rank", None)
        plan = plan_rebalance(old, new, world, node_of_rank=node_of_rank)
    except BaseException:
        if owned:
            comm.close()
        raise
    row_bytes = expert_bytes(expert_buffer)
    stats = RebalanceStats(backend=type(comm).__name__, staging_bytes=comm.staging_bytes)
    committed: list[int] = []
    try:
        for layer in range(num_layers):
            t_layer = time.perf_counter()
            weights = expert_weights[layer]
            local = plan.local_copies(layer, rank)
            runs = plan.changed_runs(layer, rank)
            if not plan.layer_moves(layer):  # all ranks agree: nothing moves anywhere
                committed.append(layer)
                stats.layer_seconds.append(0.0)
                if on_layer is not None:
                    on_layer(layer)
                continue
            synchronize(device)
            copy_rows(expert_buffer, weights, [(s, d) for _e, s, d in local])
            try:
                per_peer = comm.transfer_layer(plan, layer, weights, expert_buffer, old[layer])
            except _core.PeerTransferError as e:
                msg, peer, _ = e.args
                raise TransferError(
                    str(msg), peer=int(peer), layer=layer, committed_layers=committed
                ) from e
            except TransferError as e:
                raise TransferError(
                    str(e), peer=e.peer, layer=layer, committed_layers=committed
                ) from e
            dups = plan.dup_fills(layer, rank)
            copy_rows(expert_buffer, expert_buffer, [(s, d) for _e, s, d in dups])
            copy_runs(weights, expert_buffer, runs)
            committed.append(layer)
            stats.layer_seconds.append(time.perf_counter() - t_layer)
            n_recv = sum(per_peer.values())
            stats.experts_received += n_recv
            stats.bytes_received += n_recv * row_bytes
            stats.bytes_copied_locally += (len(local) + len(dups)) * row_bytes
            for p, n in per_peer.items():
                stats.per_peer_bytes[p] = stats.per_peer_bytes.get(p, 0) + n * row_bytes
            if on_layer is not None:
                on_layer(layer)
        synchronize(device)
        try:
            comm.end_rebalance(num_layers)
        except TransferError as e:
            raise TransferError(
                f"{e} (every layer was committed here)",
                peer=e.peer,
                layer=num_layers,
                committed_layers=committed,
            ) from e
    finally:
        if owned:
            comm.close()
    stats.layers = num_layers
    stats.seconds = time.perf_counter() - t0
    log.debug("rank %d rebalance: %s", rank, stats)
    return stats
