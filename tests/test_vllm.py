"""vLLM's EPLB call sequence against both communicators (CPU, real NIXL).

The sender/receiver choice, local copies and commit are vLLM's own
(`harness.vllm_layer_moves`, re-stated from its documented behaviour), not
the library's planner: these tests check that our communicators do what
vLLM's driver relies on.
"""

from __future__ import annotations

import pytest
import workers
from harness import pid_alive


def _clean(reports):
    for rank_report in reports:
        for case in rank_report:
            assert case["errors"] == [], f"seed {case['seed']}: {case['errors'][:3]}"


@pytest.mark.parametrize(
    ("backend", "mode"), [("nixl", "zero_copy"), ("nixl", "staged"), ("torch", None)]
)
def test_synchronous_per_layer_sequence(world, backend, mode):
    opts = {"mode": mode} if mode else {}
    _clean(world(workers.vllm_style, 3, backend, [21, 22], "context", **opts))


@pytest.mark.parametrize(("backend", "mode"), [("nixl", "zero_copy"), ("torch", None)])
def test_async_worker_thread_with_set_stream(world, backend, mode):
    opts = {"mode": mode} if mode else {}
    _clean(world(workers.vllm_style, 2, backend, [23, 24], "thread", **opts))


@pytest.mark.parametrize("mode", ["zero_copy", "staged"])
def test_older_execute_style_with_a_fresh_buffer(world, mode):
    """``execute(old_indices=...)`` and receive targets outside the registered
    buffer: they land in a registered row and are copied."""
    _clean(world(workers.vllm_style, 2, "nixl", [25], "old_indices", mode=mode))


def test_two_rebalances_on_one_communicator(world):
    _clean(world(workers.vllm_style, 2, "nixl", [26], "twice"))


def test_verified_vllm_sequence(world):
    _clean(world(workers.vllm_style, 2, "nixl", [27], "context", verify=True))


@pytest.mark.parametrize("backend", ["nixl", "torch"])
@pytest.mark.parametrize("direction", ["down", "up"])
def test_elastic_ep_rank_mapping(world, backend, direction):
    for errors in world(workers.elastic, 3, backend, direction):
        assert errors == []


def test_a_peer_dying_after_the_last_layer_surfaces_at_the_next_call(world):
    results = world(
        workers.vllm_peer_dies_after_last_layer,
        3,
        allow_failures=True,
        destroy_group=False,
        wait_for=[0, 1],
        timeout_s=120.0,
    )
    for rank in (0, 1):
        r = results[rank]
        assert r["first"]["kind"] == "ok", r  # the last layer completed everywhere
        assert r["first"]["errors"] == []
        assert r["second"]["kind"] == "TransferError" and r["second"]["peer"] == 2, r
        assert r["second"]["elapsed"] < 3.0 + 3 * 1.0 + 4.0, r


def test_a_dropped_communicator_releases_its_agent_and_exit_is_prompt(world):
    import time

    pids: list[int] = []
    t0 = time.monotonic()
    results = world(workers.dropped_communicator, 2, pids=pids)
    for r in results:
        assert r["agents_after_drop"] == 0, r
        assert r["dropped_s"] < 2.0, r
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in pids)  # exited with communicators still open
    assert time.monotonic() - t0 < 60.0
