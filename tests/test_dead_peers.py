"""Dead, stuck and vanished peers: every survivor raises the same
TransferError, in time, and no layer is committed on some ranks only.

Faults come from outside the product: a test-only stand-in for NIXL's C API
(``tests/nixl_shim.c``) makes a rank exit, hang or go silent at a chosen
protocol step; the rank's own code exits after a layer or SIGKILLs itself.
Exchange numbers: 1 = opening handshake, layer l = l + 2, 6 = closing.
"""

from __future__ import annotations

import pytest
import workers
from harness import pid_alive

TIMEOUT_S = 3.0
LAYERS = 4
# deadline + agreement rounds (1 s each here) + slack for a loaded CI machine
BOUND_S = TIMEOUT_S + 3 * 1.0 + 4.0

# (how, seq, failing layer seen by survivors, committed layers)
SCENARIOS = [
    ("kill_after_setup", 0, 0, []),
    ("mute", 1, 0, []),  # a stuck worker: alive, silent
    ("exit_after_layer", 1, 2, [0, 1]),
    ("exit_before_ready", 4, 2, [0, 1]),
    ("hang_before_done", 3, 1, [0]),
    # DONE of layer 1 reaches rank 0 only: every rank did finish layer 1,
    # so all commit it and fail at layer 2
    ("exit_mid_done", 3, 2, [0, 1]),
]


CASES = [("zero_copy", 3, [2], *s) for s in SCENARIOS] + [
    ("staged", 3, [2], *s)
    for s in SCENARIOS
    if s[:2] in (("exit_after_layer", 1), ("exit_mid_done", 3))
]
# a whole host (two ranks) at once, and two ranks that are not neighbours
CASES += [
    ("zero_copy", 4, [2, 3], "exit_before_ready", 4, 2, [0, 1]),
    ("zero_copy", 4, [1, 3], "mute", 3, 1, [0]),
]


@pytest.mark.parametrize(
    ("mode", "n", "victims", "how", "seq", "failed_layer", "committed"),
    CASES,
    ids=[f"{c[0]}-{c[1]}r-{'+'.join(map(str, c[2]))}-{c[3]}@{c[4]}" for c in CASES],
)
def test_survivors_agree_and_fail_in_time(
    world, mode, n, victims, how, seq, failed_layer, committed
):
    pids: list[int] = []
    survivors = [r for r in range(n) if r not in victims]
    results = world(
        workers.dead_peer,
        n,
        mode,
        victims,
        how,
        seq,
        allow_failures=True,
        timeout_s=120.0,
        destroy_group=False,
        wait_for=survivors,
        pids=pids,
    )
    for v in victims:  # died, was killed, or (a silent worker) failed on its own
        assert isinstance(results[v], Exception) or results[v]["kind"] != "ok", results[v]
    for rank in survivors:
        r = results[rank]
        assert r["kind"] == "TransferError", r
        assert r["peer"] == min(victims), r["msg"]  # the lowest rank that died
        assert r["blame"] == "dead", r["msg"]
        assert r["layer"] == failed_layer, r["msg"]
        assert r["committed"] == committed, r["msg"]
        assert r["errors"] == []  # committed layers hold the new placement
        assert r["untouched"]  # every other layer is bit-identical
        assert r["requests_live"] == 0
        assert min(victims) in r["failed_peers"]
        assert r["agents"] == 0
        assert "failed earlier" in r["reuse"], r["reuse"]
        assert r["elapsed"] < BOUND_S, r
        assert r["close_s"] < 1.0, r  # no linger on dead peers
    assert not any(pid_alive(p) for p in pids)  # no orphan processes


def test_peer_dying_after_the_last_done_surfaces_at_the_next_call(world):
    """The victim's last DONE (closing handshake) reaches rank 0 only, then it
    dies: every layer is committed on both survivors, the call succeeds on
    both, and the next call raises TransferError naming the victim on both."""
    results = world(
        workers.dead_peer,
        3,
        "zero_copy",
        [2],
        "exit_mid_done",
        6,
        allow_failures=True,
        timeout_s=120.0,
        destroy_group=False,
        wait_for=[0, 1],
    )
    for rank in (0, 1):
        r = results[rank]
        assert r["kind"] == "ok", r
        assert r["errors"] == []
        assert r["reuse"].startswith("TransferError") and "rank 2" in r["reuse"], r["reuse"]
