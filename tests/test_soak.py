"""Soak: many consecutive rebalances through one communicator stay correct and
leak nothing (NIXL requests, prepared lists, buffered messages, memory).
``benches/soak.py`` runs the same loop 2000 times and reports numbers."""

from __future__ import annotations

import functools

import pytest

from eplb_xfer.testing import soak_rank

RSS_GROWTH_LIMIT = 16 << 20  # bytes after warm-up; a leak per rebalance would exceed it


@pytest.mark.parametrize(
    ("mode", "verify", "rounds"), [("zero_copy", False, 200), ("staged", True, 60)]
)
def test_consecutive_rebalances_stay_correct_and_bounded(world, mode, verify, rounds):
    world_size = 2
    run = functools.partial(soak_rank, verify_checksums=verify)
    for r in world(run, world_size, mode, rounds, timeout_s=300.0):
        assert r["errors"] == []
        assert r["requests_live_seen"] == [0]  # every READ request released
        assert r["prepared_lists_live_seen"] == [world_size]  # built once, never more
        assert r["inbox_entries_max"] <= 4 * world_size  # only the next exchange's messages
        assert r["counters_end"]["exchanges"] >= rounds  # at least the closing barriers
        assert r["rss_end"] - r["rss_after_warmup"] < RSS_GROWTH_LIMIT, r
