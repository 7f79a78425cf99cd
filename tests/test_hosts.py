"""Two emulated hosts x two ranks on one machine, over real NIXL.

Each host is a network namespace plus its own PID/IPC/UTS namespaces
(``emulated_hosts``): UCX moves bytes with ``cma`` between the ranks of one
host and over ``tcp`` across the veth pair between hosts; the gloo group also
runs over the veth. Checked: byte-exact rebalances, same-host source
preference, a host killed mid-rebalance, the link taken down mid-rebalance;
and that nothing (processes, namespaces, temporary files) is left behind.

Needs root and iproute2/util-linux; skipped with the reason otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import emulated_hosts
import hosts_workers
import pytest
from emulated_hosts import Action, EmulatedHosts, RankOutcome

_OK, _WHY = emulated_hosts.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"emulated hosts unavailable: {_WHY}")

NODES = [0, 0, 1, 1]
QUIET_UCX = {"UCX_WARN_UNUSED_ENV_VARS": "n", "UCX_LOG_LEVEL": "fatal"}
FAULT_TIMEOUT_S = 3.0
#: Generous ceiling for "in bounded time": the deadline, two agreement rounds
#: (min(1 s, timeout / 2) each), and slack for 4 processes on 2 shared cores.
FAIL_CEILING_S = FAULT_TIMEOUT_S + 2.0 + 10.0
#: close() after a TransferError does not linger on dead peers.
CLOSE_CEILING_S = 1.5


Scenario = tuple[list[RankOutcome], list[str]]


def _run(fn: Any, *args: Any, actions: tuple[Action, ...] = (), **kw: Any) -> Scenario:
    """Runs ``fn`` on 2 hosts x 2 ranks; returns outcomes and what was left behind."""
    with EmulatedHosts(hosts=2, ranks_per_host=2) as eh:
        outcomes = eh.run(fn, *args, actions=actions, env=dict(QUIET_UCX), **kw)
    return outcomes, eh.leftovers()


@pytest.fixture(scope="module")
def healthy() -> Iterator[Scenario]:
    yield _run(hosts_workers.rebalance_across_hosts, 5, NODES, timeout_s=120.0, check=True)


@pytest.fixture(scope="module")
def killed_host() -> Iterator[Scenario]:
    yield _run(
        hosts_workers.rebalance_with_fault,
        21,
        2,  # rank 2 (host 1) signals after committing layer 0 ...
        "kill",
        FAULT_TIMEOUT_S,
        actions=(Action("kill_host", host=1, on="kill"),),  # ... and host 1 dies
        timeout_s=90.0,
        destroy_group=False,
    )


@pytest.fixture(scope="module")
def link_down() -> Iterator[Scenario]:
    yield _run(
        hosts_workers.rebalance_with_fault,
        31,
        0,  # rank 0 signals after committing layer 0 ...
        "down",
        FAULT_TIMEOUT_S,
        actions=(Action("link_down", on="down"),),  # ... and the veth goes down
        timeout_s=90.0,
        destroy_group=False,
    )


# --------------------------------------------------------------------------- healthy


def test_rebalance_is_byte_exact_across_hosts(healthy: Scenario) -> None:
    outcomes, leftovers = healthy
    for o in outcomes:
        r = o.value
        assert r["oracle_catches"], "the byte oracle must detect a flipped byte"
        assert r["errors_forward"] == [], r["errors_forward"][:5]
        assert r["errors_back"] == [], r["errors_back"][:5]
        assert o.exited_cleanly, (o.exit_code, o.log_tail)
    # Bytes really crossed hosts and really stayed inside them.
    reads = [(o.rank, x["src"]) for o in outcomes for x in o.value["reads"]]
    assert any(NODES[dst] != NODES[src] for dst, src in reads)
    assert any(NODES[dst] == NODES[src] for dst, src in reads)
    assert leftovers == []


def test_nodes_and_directions_are_detected(healthy: Scenario) -> None:
    """Nodes come from what UCX can use (same kernel and PID namespace), not
    host names; inside a host rows move by READ (cma), across hosts by WRITE
    (tcp would emulate GET with round trips)."""
    outcomes, _ = healthy
    assert [o.value["learned_nodes"] for o in outcomes] == [NODES] * 4
    for o in outcomes:
        dirs = o.value["directions"]
        for peer, d in enumerate(dirs):
            if peer == o.rank:
                assert d == "self"
            else:
                assert d == ("read" if NODES[peer] == NODES[o.rank] else "write"), dirs


def test_same_host_sources_are_preferred(healthy: Scenario) -> None:
    outcomes, _ = healthy
    choices = 0
    for o in outcomes:
        r = o.value
        # The bytes the engine read per peer are those of the plan checked below.
        assert r["per_peer_bytes"] == r["planned_bytes"], (o.rank, r)
        for x in r["reads"]:
            if x["same_host_holders"]:
                assert NODES[x["src"]] == NODES[o.rank], (o.rank, x)
                choices += bool(x["other_host_holders"])
    assert choices > 0, "the placement never offered a choice between hosts"


# --------------------------------------------------------------------------- killed host


def test_killed_host_survivors_fail_in_time(killed_host: Scenario) -> None:
    outcomes, leftovers = killed_host
    assert [o.killed_with_host for o in outcomes] == [False, False, True, True]
    for o in outcomes[:2]:
        r = o.value if o.ok else o.partial
        assert r is not None, o.error
        assert r["kind"] == "TransferError", r
        assert r["peer"] in (2, 3), r["msg"]
        assert r["elapsed"] < FAIL_CEILING_S, r
        assert r["errors"] == [], r["errors"][:5]  # committed layers new, others old
        assert 0 in r["committed"], r
        assert o.ok and o.exited_cleanly, (o.exit_code, o.error)
        assert r["close_s"] < CLOSE_CEILING_S, r
    assert leftovers == []


def test_killed_host_survivors_name_the_same_peer(killed_host: Scenario) -> None:
    """Both ranks of host 1 die at once: both survivors name the lowest dead
    rank and agree on the failing layer and the committed layers."""
    outcomes, _ = killed_host
    reports = [o.value if o.ok else o.partial or {} for o in outcomes[:2]]
    assert [r.get("peer") for r in reports] == [2, 2], reports
    assert all(r.get("blame") == "dead" for r in reports), reports
    assert reports[0]["layer"] == reports[1]["layer"], reports
    assert reports[0]["committed"] == reports[1]["committed"], reports


# --------------------------------------------------------------------------- link down


def _reports(outcomes: list[RankOutcome]) -> list[dict[str, Any]]:
    return [o.value if o.ok else o.partial for o in outcomes]


def test_link_down_every_rank_fails_in_time(link_down: Scenario) -> None:
    outcomes, leftovers = link_down
    for o, r in zip(outcomes, _reports(outcomes)):
        assert r is not None, o.error
        assert r["kind"] == "TransferError", (o.rank, r)
        assert r["elapsed"] < FAIL_CEILING_S, (o.rank, r)
        assert r["errors"] == [], r["errors"][:5]
        assert 0 in r["committed"], r
    assert leftovers == []


def test_link_down_each_side_agrees(link_down: Scenario) -> None:
    """A partition cannot agree across the cut, but each side agrees with
    itself and names a rank on the other side."""
    outcomes, _ = link_down
    reports = _reports(outcomes)
    for host in (0, 1):
        side = [r for o, r in zip(outcomes, reports) if NODES[o.rank] == host]
        assert len({(r["peer"], r["layer"], tuple(r["committed"])) for r in side}) == 1, side
        assert all(NODES[r["peer"]] != host for r in side), side


def test_link_down_close_does_not_crash(link_down: Scenario) -> None:
    outcomes, _ = link_down
    for o in outcomes:
        assert o.ok and o.exited_cleanly, (o.rank, o.exit_code, o.error)
        assert o.value["close_s"] < CLOSE_CEILING_S, o.value


# --------------------------------------------------------------------------- harness


def test_harness_reports_every_failure_and_cleans_up() -> None:
    """Four hosts of one rank on a bridge: a result, an exception, an exit
    without a result, a hang past the deadline; nothing is left behind."""
    with EmulatedHosts(hosts=4, ranks_per_host=1) as eh:
        hostnames = [h.hostname for h in eh.hosts]
        outcomes = eh.run(hosts_workers.misbehave, timeout_s=25.0, destroy_group=False)
    assert eh.leftovers() == []
    ok, raised, exited, hung = outcomes
    # (its exit may be slow while a peer hangs in the group: only the result counts)
    assert ok.ok, ok.error
    assert ok.value["seen"] == [(name, h) for h, name in enumerate(hostnames)]
    assert not raised.ok and "ValueError: rank 1 fails on purpose" in raised.error
    assert raised.exit_code == 1
    assert not exited.ok and exited.exit_code == 3 and "without a result" in exited.error
    assert not hung.ok and "no result within" in hung.error and hung.exit_code == -9
    assert all(o.partial == ok.value["seen"] for o in outcomes)
    assert not any(o.killed_with_host for o in outcomes)


def test_sweeper_removes_namespaces_of_dead_runs() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a controller PID that no longer exists
    ns = f"{emulated_hosts.PREFIX}-{dead.pid}-sweeptest-h0"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        removed = emulated_hosts.sweep_leftovers()
        assert ns in removed
        assert (
            ns
            not in subprocess.run(
                ["ip", "netns", "list"], capture_output=True, text=True
            ).stdout.split()
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
