"""The torch.distributed baseline through the public driver (gloo, CPU)."""

from __future__ import annotations

import pytest
import workers


@pytest.mark.parametrize("n", [2, 4])
def test_random_rebalances_are_byte_exact(world, n):
    seeds = [1, 2, 3, 4, 5] if n == 2 else [6, 7, 10]
    for rank_report in world(workers.rebalance_cases, n, "torch", seeds):
        for case in rank_report:
            assert case["errors"] == [], f"seed {case['seed']}: {case['errors'][:3]}"
            assert case["staging"] == 0
