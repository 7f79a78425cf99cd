"""Soak: many consecutive rebalances through one communicator stay correct
and leak nothing (NIXL requests, prepared lists, buffered messages, memory).
``benches/soak.py`` runs the same loop longer and reports numbers."""

from __future__ import annotations

import pytest
import workers

RSS_GROWTH_LIMIT = 16 << 20  # bytes after warm-up; a leak per rebalance would exceed it


@pytest.mark.parametrize(
    ("mode", "verify", "rounds"), [("zero_copy", False, 200), ("staged", True, 60)]
)
def test_consecutive_rebalances_stay_correct_and_bounded(world, mode, verify, rounds):
    n = 2
    for r in world(workers.soak, n, mode, rounds, verify, timeout_s=300.0):
        assert r["errors"] == []
        assert r["requests_live_seen"] == [0]  # every request released
        assert len(r["prepared_lists_live_seen"]) == 1  # built once, never more
        assert r["buffered_max"] <= 2 * n + 2  # only the next exchange's messages
        assert r["exchanges"] >= rounds * 2  # opening and closing handshakes at least
        assert r["rss_end"] - r["rss_warm"] < RSS_GROWTH_LIMIT, r
