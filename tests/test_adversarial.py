"""Callers that disagree, race, interrupt, fork or fail half-way: every rank
gets a clear exception, in time, and no layer is committed on some ranks
only (CPU, real NIXL)."""

from __future__ import annotations

import pytest
import workers


@pytest.mark.parametrize("what", ["new", "old"])
def test_ranks_that_disagree_on_the_placement_all_raise_before_anything_moves(world, what):
    results = world(workers.disagree, 3, what)
    peers = {r["peer"] for r in results}
    assert len(peers) == 1, results
    for r in results:
        assert r["kind"] == "TransferError", r
        assert r["blame"] == "disagreement", r
        assert r["layer"] == 0 and r["committed"] == [], r
        assert r["weights_untouched"] and r["buffer_untouched"], r
        assert r["elapsed"] < 5.0, r  # no deadline wait: the opening handshake says so


def test_vllm_ranks_that_disagree_on_rows_all_raise(world):
    results = world(workers.vllm_disagree, 2)
    for r in results:
        assert r["kind"] == "TransferError" and r["blame"] == "disagreement", r
        assert r["buffer_untouched"], r
    assert len({r["peer"] for r in results}) == 1


def test_second_thread_is_refused_and_nothing_blocks(world):
    r0, r1 = world(workers.threads_on_one_communicator, 2)
    assert r0["second"]["kind"] == "RuntimeError" and "another thread" in r0["second"]["msg"]
    assert r0["second"]["elapsed"] < 0.5
    assert r0["counters_s"] < 0.5 and r0["python_s"] < 0.5  # the GIL is free while waiting
    for r in (r0, r1):
        assert r["first"]["kind"] == "ok", r
        assert r["errors"] == []


def test_close_from_another_thread_aborts_and_peers_learn(world):
    r0, r1 = world(workers.close_from_another_thread, 2, destroy_group=False)
    assert r0["call"]["kind"] == "TransferError" and r0["call"]["elapsed"] < 3.0, r0
    assert r0["close_s"] < 3.0
    assert r1["call"]["kind"] == "TransferError" and r1["call"]["peer"] == 0, r1
    assert r1["call"]["elapsed"] < 3.0, r1
    assert r0["agents"] == 0 and r1["agents"] == 0


@pytest.mark.parametrize(("delay_s", "seed"), [(0.05, 1), (0.25, 2), (0.4, 3), (0.55, 4)])
def test_ctrl_c_is_seen_quickly_and_every_rank_agrees(world, delay_s, seed):
    r0, r1 = world(workers.sigint_during_rebalance, 2, delay_s, seed, destroy_group=False)
    assert r0["kind"] == "TransferInterrupted", r0
    assert r0["elapsed"] < delay_s + 2.5, r0  # seen within ~100 ms, then one agreement round
    assert r1["kind"] == "TransferError" and r1["peer"] == 0 and r1["blame"] == "interrupted", r1
    assert r0["committed"] == r1["committed"], (r0, r1)  # no split commit
    for r in (r0, r1):
        assert r["errors"] == [] and r["untouched"], r


def test_error_after_validation_tells_the_peers_at_once(world):
    r0, r1 = world(workers.error_after_validation, 2, destroy_group=False)
    assert r0["kind"] == "RuntimeError" and "simulated" in r0["msg"], r0
    assert r1["kind"] == "TransferError" and r1["peer"] == 0 and r1["blame"] == "failed", r1
    assert r1["elapsed"] < 5.0, r1  # not the 30 s deadline


def test_a_late_rank_sees_an_abort_sent_before_it_arrived(world):
    _r0, r1, r2 = world(workers.late_arrival, 3, destroy_group=False)
    assert r1["kind"] == "TransferError" and r1["peer"] == 0, r1
    assert r2["kind"] == "TransferError" and r2["peer"] == 0, r2
    assert r2["elapsed"] < 1.0, r2  # at once, not after its own 20 s deadline


def test_a_forked_child_never_tears_down_the_parents_agent(world):
    for r in world(workers.fork_child_leaves_parent_alone, 2):
        assert r["child_status"] == 0, r
        assert r["kind"] == "ok", r
        assert r["errors"] == []
        assert r["agents"] == 0


def test_a_tensor_reallocated_after_set_up_is_refused(world):
    for r in world(workers.reallocated_tensor, 2):
        assert r["kind"] == "ValueError" and "expert_weights[1][0]" in r["msg"], r
