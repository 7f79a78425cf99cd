"""Test-only re-implementation of DeepSeek's EPLB algorithm in numpy.

Written for these tests from the published description of the algorithm (not
copied from any implementation), step by step and without tricks, so that the
Rust implementation has an independent oracle:

1. pack expert groups to nodes by balanced packing of the group loads;
2. inside each node, give every expert one slot, then each redundant slot to
   the expert with the largest load per replica (first expert on ties);
3. pack each node's physical experts (load / replicas) to its ranks by
   balanced packing.

Balanced packing: items heaviest first (ties: lower index first), each into the
lightest pack that still has room (ties: lower pack first); a pack's slots fill
in that order. Loads are float32 and pack loads accumulate in float32, as in
the reference. ``num_groups % num_nodes != 0`` falls back to one group and one
node.
"""

from __future__ import annotations

import numpy as np


def balanced_packing(weights: np.ndarray, num_packs: int) -> tuple[list[int], list[int]]:
    """``(pack, position in pack)`` of each item; equal item counts per pack."""
    n = len(weights)
    per = n // num_packs
    if per == 1:
        return list(range(n)), [0] * n
    order = sorted(range(n), key=lambda i: (-float(weights[i]), i))
    loads = [np.float32(0.0)] * num_packs
    sizes = [0] * num_packs
    pack = [0] * n
    rank = [0] * n
    for i in order:
        open_packs = [p for p in range(num_packs) if sizes[p] < per]
        best = min(open_packs, key=lambda p: (loads[p], p))
        pack[i] = best
        rank[i] = sizes[best]
        loads[best] = np.float32(loads[best] + weights[i])
        sizes[best] += 1
    return pack, rank


def replicate(weights: np.ndarray, num_phy: int) -> tuple[list[int], list[int]]:
    """``(phy2log, count)``: one replica each, then the largest load per replica."""
    n = len(weights)
    count = [1] * n
    phy2log = list(range(n))
    for _ in range(n, num_phy):
        ratios = [np.float32(weights[e]) / np.float32(count[e]) for e in range(n)]
        best = max(range(n), key=lambda e: (ratios[e], -e))
        phy2log.append(best)
        count[best] += 1
    return phy2log, count


def stock_layer(
    w: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_ranks: int
) -> np.ndarray:
    """DeepSeek's ``phy2log`` of one layer."""
    experts = len(w)
    if num_groups % num_nodes != 0:
        num_groups, num_nodes = 1, 1
    w32 = w.astype(np.float32)
    group_size = experts // num_groups
    groups_per_node = num_groups // num_nodes
    group_loads = np.array(
        [np.float32(w32[g * group_size : (g + 1) * group_size].astype(np.float64).sum())
         for g in range(num_groups)],
        dtype=np.float32,
    )  # fmt: skip
    gpack, grank = balanced_packing(group_loads, num_nodes)
    # Node-major order of the logical experts.
    node_major = [0] * experts
    for g in range(num_groups):
        base = (gpack[g] * groups_per_node + grank[g]) * group_size
        for j in range(group_size):
            node_major[base + j] = g * group_size + j
    per_node_log = experts // num_nodes
    per_node_phy = num_replicas // num_nodes
    ranks_per_node = num_ranks // num_nodes
    slots_per_rank = num_replicas // num_ranks
    out = np.zeros(num_replicas, dtype=np.int64)
    for node in range(num_nodes):
        logical = node_major[node * per_node_log : (node + 1) * per_node_log]
        node_w = w32[logical]
        phy2log, count = replicate(node_w, per_node_phy)
        phy_load = np.array(
            [np.float32(node_w[m]) / np.float32(count[m]) for m in phy2log], dtype=np.float32
        )
        pack, rank = balanced_packing(phy_load, ranks_per_node)
        for i, m in enumerate(phy2log):
            out[node * per_node_phy + pack[i] * slots_per_rank + rank[i]] = logical[m]
    return out


def stock(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_ranks: int
) -> np.ndarray:
    """DeepSeek's ``phy2log`` ``[num_layers, num_replicas]``."""
    return np.stack(
        [stock_layer(w, num_replicas, num_groups, num_nodes, num_ranks) for w in weight]
    ).reshape(len(weight), num_replicas)


def rank_loads(w: np.ndarray, phy2log: np.ndarray, num_ranks: int) -> np.ndarray:
    """Load of every rank of one layer: sum of ``load / replicas`` over its slots."""
    counts = np.bincount(phy2log[phy2log >= 0], minlength=len(w)).astype(np.float64)
    per_slot = np.where(phy2log >= 0, w[np.maximum(phy2log, 0)] / np.maximum(counts[phy2log], 1), 0)
    return per_slot.reshape(num_ranks, -1).sum(axis=1)


def experts_received(old: np.ndarray, new: np.ndarray, num_ranks: int) -> int:
    """Distinct experts each rank holds in ``new`` but not in ``old`` (one layer)."""
    total = 0
    for o, n in zip(old.reshape(num_ranks, -1), new.reshape(num_ranks, -1)):
        total += len(set(n.tolist()) - set(o.tolist()) - {-1})
    return total
