"""``plan_rebalance``: the Python face of the Rust planner."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import _core
from ._tensors import check_int, to_indices

TransferPlan = _core.TransferPlan


def plan_rebalance(
    old_indices: object,
    new_indices: object,
    ep_size: int,
    *,
    node_of_rank: Sequence[int] | None = None,
) -> TransferPlan:
    """Plans a rebalance from ``old`` to ``new`` placement, for every rank.

    Args:
        old_indices: int ``[L, P]`` (torch.Tensor or numpy array), logical expert
            per physical slot before the rebalance, -1 = empty slot.
        new_indices: int ``[L, P]``, the placement to reach.
        ep_size: number of EP ranks; rank r owns slots ``[r*P/ep, (r+1)*P/ep)``.
        node_of_rank: optional node id of each rank; same-node sources are preferred.

    Returns:
        A :class:`TransferPlan`, identical on every rank that computes it
        (its ``fingerprint`` hashes all of the above).

    Raises:
        TypeError / ValueError naming the argument and value on bad input.
    """
    old = to_indices(old_indices, "old_indices")
    new = to_indices(new_indices, "new_indices")
    if old.shape != new.shape:
        raise ValueError(
            f"new_indices: shape {tuple(new.shape)} differs from old_indices {tuple(old.shape)}"
        )
    ep = check_int(ep_size, "ep_size", 1)
    nodes = None
    if node_of_rank is not None:
        if isinstance(node_of_rank, (str, bytes)) or not hasattr(node_of_rank, "__len__"):
            raise TypeError(
                f"node_of_rank: expected a list of ints, got {type(node_of_rank).__name__}"
            )
        nodes = [check_int(n, "node_of_rank", 0, np.iinfo(np.int32).max) for n in node_of_rank]
    num_layers, num_slots = old.shape
    return _core.plan_rebalance_bytes(
        old.tobytes(), new.tobytes(), num_layers, num_slots, ep, nodes
    )
