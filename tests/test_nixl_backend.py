"""NIXL backend over real NIXL (UCX over DRAM between processes)."""

from __future__ import annotations

import pytest
import workers


@pytest.mark.parametrize("mode", ["zero_copy", "staged"])
@pytest.mark.parametrize("n", [2, 4])
def test_driver_rebalances_are_byte_exact(world, n, mode):
    seeds = [1, 2, 3, 4, 5, 8] if n == 2 else [6, 9, 12]
    reports = world(workers.rebalance_cases, n, "nixl", mode, seeds)
    received = 0
    for rank_report in reports:
        for seed, errors, got, _staging in rank_report:
            assert errors == [], f"seed {seed}: {errors[:3]}"
            received += got
    assert received > 0  # the scenarios really moved experts


@pytest.mark.parametrize(
    ("mode", "pass_old"), [("zero_copy", False), ("staged", False), ("staged", True)]
)
def test_vllm_call_style(world, mode, pass_old):
    for rank_report in world(workers.vllm_style_cases, 2, mode, [21, 22], pass_old):
        for seed, errors, staging, exchanges in rank_report:
            assert errors == [], f"seed {seed}: {errors[:3]}"
            assert exchanges == 2  # one per layer
            assert (staging == 0) == (mode == "zero_copy")


@pytest.mark.parametrize("mode", ["zero_copy", "staged"])
def test_repeated_rebalances_reuse_prepared_lists(world, mode):
    n = 3
    reports = world(workers.repeated_rebalances, n, mode, 3)
    for built_setup, built_end, staging, errors, nodes in reports:
        assert errors == []
        assert nodes == [0] * n  # one host: every rank on node 0
        assert built_setup == n  # one local list + one per peer
        assert built_end == built_setup  # never rebuilt
        if mode == "zero_copy":
            assert staging == 0
        else:
            assert staging > 0
