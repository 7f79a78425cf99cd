"""NIXL backend through the driver, over real NIXL (UCX over DRAM between processes)."""

from __future__ import annotations

import pytest
import workers


def _all_ok(reports):
    received = 0
    for rank_report in reports:
        for case in rank_report:
            assert case["errors"] == [], f"seed {case['seed']}: {case['errors'][:3]}"
            received += case["received"]
    assert received > 0  # the scenarios really moved experts


@pytest.mark.parametrize("mode", ["zero_copy", "staged"])
@pytest.mark.parametrize("n", [2, 4])
def test_driver_rebalances_are_byte_exact(world, n, mode):
    seeds = [1, 2, 3, 4, 5, 8] if n == 2 else [6, 9, 12]
    _all_ok(world(workers.rebalance_cases, n, "nixl", seeds, mode=mode))


@pytest.mark.parametrize("mode", ["zero_copy", "staged"])
def test_write_direction_is_byte_exact(world, mode):
    """Sources WRITE into readers' buffers (what tcp links use), completion by
    notification; forced here on one host."""
    reports = world(workers.rebalance_cases, 3, "nixl", [1, 2, 4], mode=mode, direction="write")
    _all_ok(reports)
    for rank, rank_report in enumerate(reports):
        dirs = rank_report[0]["directions"]
        assert dirs[rank] == "self" and set(dirs) - {"self"} == {"write"}


def test_cross_node_rounds_are_byte_exact(world):
    """Four ranks declared on four nodes: cross-node transfers run in pairing
    rounds (each node talks to one other at a time); mixed directions."""
    _all_ok(
        world(
            workers.rebalance_cases, 4, "nixl", [6, 9], node_of_rank=[0, 1, 2, 3], mode="zero_copy"
        )
    )


@pytest.mark.parametrize("mode", ["zero_copy", "staged"])
def test_repeated_rebalances_reuse_prepared_lists(world, mode):
    n = 3
    for r in world(workers.repeated_rebalances, n, mode, 3):
        assert r["errors"] == []
        assert r["nodes"] == [0] * n  # one host (one kernel, one PID namespace)
        assert set(r["directions"]) == {"self", "read"}  # cma: READ inside a node
        assert r["lists_end"] == r["lists_after_setup"]  # built once, never rebuilt
        assert r["requests_live"] == 0
        assert (r["staging"] == 0) == (mode == "zero_copy")
        assert r["agents_after_close"] == 0
