"""Dead and stuck peers: every survivor raises the same TransferError in time.

Each scenario runs 3 ranks over real NIXL with ``timeout_s=3``; rank 2 dies
(``os._exit`` or a process exit inside the protocol) or hangs (sleeps, so it
stops answering) at a chosen point. Survivors must all raise TransferError
naming rank 2 and the same layer, agree on ``committed_layers``, have applied
exactly those layers and left every other layer bit-identical, hold no NIXL
request, and release their agents on close. No process may outlive the test.
"""

from __future__ import annotations

import os

import pytest
import workers

VICTIM = 2
TIMEOUT_S = 3.0
LAYERS = 4

# (how, layer, failing layer seen by survivors, committed layers)
SCENARIOS = [
    ("exit_after_setup", 0, 0, []),
    ("hang_after_setup", 0, 0, []),
    ("exit_after_layer", 1, 2, [0, 1]),
    ("exit_before_ready", 2, 2, [0, 1]),
    ("hang_before_done", 1, 1, [0]),
    # DONE of layer 1 reaches rank 0 only: rank 0 commits layer 1, and rank 1,
    # which never gets that DONE, learns from rank 0 that the layer completed.
    ("exit_mid_done", 1, 2, [0, 1]),
    # the same at the last layer: the end-of-rebalance barrier settles it
    ("exit_mid_done", 3, LAYERS, [0, 1, 2, 3]),
]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# every scenario in zero-copy mode; staged mode shares the protocol, two suffice
CASES = [("zero_copy", *s) for s in SCENARIOS] + [
    ("staged", *s) for s in SCENARIOS if s[:2] in (("exit_after_layer", 1), ("exit_mid_done", 1))
]


@pytest.mark.parametrize(
    ("mode", "how", "at", "failed_layer", "committed"),
    CASES,
    ids=[f"{c[0]}-{c[1]}@{c[2]}" for c in CASES],
)
def test_survivors_agree_and_fail_in_time(world, mode, how, at, failed_layer, committed):
    pids: list[int] = []
    results = world(
        workers.dead_peer,
        3,
        mode,
        VICTIM,
        how,
        at,
        allow_failures=True,
        timeout_s=120.0,
        env={"EPLB_XFER_NO_DESTROY": "1"},
        wait_for=[0, 1],
        pids=pids,
    )
    assert isinstance(results[VICTIM], Exception)  # died or was killed
    for rank in (0, 1):
        r = results[rank]
        assert r["kind"] == "TransferError", r
        assert r["peer"] == VICTIM, r["msg"]
        assert r["layer"] == failed_layer, r["msg"]
        assert r["committed"] == committed, r["msg"]
        assert r["errors"] == []  # committed layers hold the new placement
        assert r["untouched"]  # every other layer is bit-identical
        assert r["requests_live"] == 0
        assert VICTIM in r["failed_peers"]
        assert r["live_agents_after_close"] == 0
        assert "failed earlier" in r["reuse"], r["reuse"]
        assert r["elapsed"] < TIMEOUT_S + 10, r  # no hang: deadline plus grace
    assert not any(_alive(p) for p in pids)  # no orphan processes
