"""plan_rebalance through the Python API: inputs, validation, contents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import eplb_xfer


def test_swap_between_two_ranks_reads_each_expert_once():
    old = np.array([[0, 1, 2, 3]])
    new = np.array([[2, 1, 0, 3]])
    plan = eplb_xfer.plan_rebalance(old, new, 2)
    assert plan.recvs(0, 0) == [(2, 1, 0, 0)]
    assert plan.recvs(0, 1) == [(0, 0, 0, 0)]
    assert plan.sends(0, 1) == [(2, 0, [0])]
    assert plan.unchanged(0, 0) == [1]
    assert plan.changed_runs(0, 0) == [(0, 1)]
    assert plan.layer_moves(0)


def test_replica_read_by_two_ranks_is_sent_once():
    # expert 5 lives only on rank 0; ranks 1 and 2 both need it
    old = np.array([[5, 0, 1, 2, 3, 4]])
    new = np.array([[5, 0, 5, 2, 5, 4]])
    plan = eplb_xfer.plan_rebalance(old, new, 3)
    assert plan.sends(0, 0) == [(5, 0, [1, 2])]


def test_duplicate_rows_are_received_once_and_filled_locally():
    old = np.array([[7, 8, 0, 1]])
    new = np.array([[0, 0, 7, 8]])
    plan = eplb_xfer.plan_rebalance(old, new, 2)
    assert len(plan.recvs(0, 0)) == 1
    assert plan.dup_fills(0, 0) == [(0, 0, 1)]


def test_torch_and_numpy_inputs_give_the_same_plan():
    rng = np.random.default_rng(0)
    old = np.stack([rng.permutation(8) for _ in range(3)])
    new = np.stack([rng.permutation(8) for _ in range(3)])
    a = eplb_xfer.plan_rebalance(old, new, 4)
    b = eplb_xfer.plan_rebalance(torch.from_numpy(old), torch.from_numpy(new).int(), 4)
    for layer in range(3):
        for r in range(4):
            assert a.recvs(layer, r) == b.recvs(layer, r)
            assert a.sends(layer, r) == b.sends(layer, r)


def test_no_change_moves_nothing():
    old = np.array([[0, 1, 2, -1]])
    plan = eplb_xfer.plan_rebalance(old, old.copy(), 2)
    assert not plan.layer_moves(0)
    assert plan.summary()["recvs"] == 0


def test_empty_new_slot_keeps_its_row():
    plan = eplb_xfer.plan_rebalance(np.array([[0, 1, 2, 3]]), np.array([[0, -1, 2, 3]]), 2)
    assert not plan.layer_moves(0)


def test_same_node_sources_are_preferred():
    # expert 0 on ranks 0 (node 0) and 2 (node 1); rank 3 (node 1) needs it
    old = np.array([[0, 1, 2, 3, 0, 4, 5, 6]])
    new = np.array([[0, 1, 2, 3, 0, 4, 5, 0]])
    plan = eplb_xfer.plan_rebalance(old, new, 4, node_of_rank=[0, 0, 1, 1])
    assert [r[1] for r in plan.recvs(0, 3)] == [2]


@pytest.mark.parametrize(
    ("old", "new", "ep", "exc", "needle"),
    [
        ([[0, 1, 2]], [[0, 1, 2]], 2, ValueError, "ep_size"),
        ([[0, 1]], [[0, 1, 2, 3]], 2, ValueError, "new_indices"),
        ([[0, 1, 2, 3]], [[0, 1, -2, 3]], 2, ValueError, "-2"),
        ([[0, 1, 2, 3]], [[0, 1, 9, 3]], 2, ValueError, "9"),
        ([[0, 1]], [[0, 1]], 0, ValueError, "ep_size"),
        ([[0.0, 1.0]], [[0, 1]], 1, TypeError, "old_indices"),
        ([0, 1], [0, 1], 1, ValueError, "old_indices"),
    ],
)
def test_bad_input_names_the_argument(old, new, ep, exc, needle):
    with pytest.raises(exc, match=needle):
        eplb_xfer.plan_rebalance(np.array(old), np.array(new), ep)
