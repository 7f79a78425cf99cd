"""Rank functions run in spawned processes by the tests (must be importable)."""

from __future__ import annotations

import eplb_xfer
import numpy as np
import torch
from eplb_xfer.testing import TensorSpec, build_weights, random_placement, verify

MIXED = [
    TensorSpec("w13", torch.uint8, (8, 12)),
    TensorSpec("s13", torch.float32, (2, 3)),
    TensorSpec("b13", torch.bfloat16, (5,)),
    TensorSpec("w2", torch.uint8, (12, 4)),
]


def scenario(seed: int, world: int, layers: int, n_local: int, empty: int = 1, experts=None):
    rng = np.random.default_rng(seed)
    num_slots = world * n_local
    num_experts = experts or max(1, num_slots - world - empty)
    old = random_placement(rng, layers, num_experts, num_slots, empty)
    new = random_placement(rng, layers, num_experts, num_slots, empty)
    return old, new, num_experts


def make_comm(backend: str, weights, buffer, mode: str = "zero_copy", timeout_s: float = 30.0):
    if backend == "torch":
        return eplb_xfer.create_communicator("torch", None, weights, buffer)
    return eplb_xfer.create_communicator(
        "nixl", None, weights, buffer, mode=mode, timeout_s=timeout_s
    )


def rebalance_cases(rank: int, world: int, backend: str, mode: str, seeds: list[int]):
    """Several random rebalances through the driver; returns mismatch lists."""
    report = []
    for seed in seeds:
        layers = 1 + seed % 3
        n_local = 2 + seed % 3
        old, new, E = scenario(seed, world, layers, n_local, empty=seed % 2)
        if seed % 5 == 0:
            new = old.copy()  # the no-change case
        weights, buffer = build_weights(MIXED, old, rank, world, E, seed)
        comm = make_comm(backend, weights, buffer, mode)
        try:
            stats = eplb_xfer.rearrange_expert_weights_inplace(
                old, new, weights, buffer, None, comm
            )
        finally:
            comm.close()
        errs = verify(MIXED, weights, old, new, rank, world, E, seed)
        report.append((seed, errs, stats.experts_received, comm.staging_bytes))
    return report
