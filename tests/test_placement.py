"""``eplb_xfer.rebalance_experts`` and friends, against the public API.

Stock placements are compared with an independent numpy re-implementation of
DeepSeek's algorithm (``eplb_reference.py``); migration-aware ones are checked
for every invariant: valid slots, every expert replicated, node constraints,
the balance guard against stock (sorted rank loads never above, prefix by
prefix), fewer experts moved than relabeling, determinism. Bad input raises
``ValueError`` / ``TypeError`` naming the argument.
"""

from __future__ import annotations

import eplb_reference as ref
import numpy as np
import pytest
import torch

import eplb_xfer
from eplb_xfer import placement

# (num_logical_experts, num_replicas, num_groups, num_nodes, num_ranks)
SHAPES = [
    (16, 24, 4, 2, 4),  # hierarchical, 2 nodes
    (16, 24, 4, 1, 4),  # hierarchical, one node
    (16, 24, 3, 2, 4),  # groups % nodes != 0: DeepSeek's global fallback
    (12, 12, 4, 2, 4),  # no redundant slot
    (10, 16, 1, 1, 1),  # one rank
    (32, 48, 8, 4, 8),  # 4 nodes, 2 groups per node
    (8, 64, 2, 2, 8),  # many replicas per expert
]

EPS = 1e-9


def loads(rng: np.random.Generator, layers: int, experts: int, kind: str) -> np.ndarray:
    if kind == "lognormal":
        return rng.lognormal(0.0, 1.0, (layers, experts)) * 1000
    if kind == "ties":
        return rng.integers(0, 4, (layers, experts)).astype(np.float64)
    if kind == "zeros":
        return np.zeros((layers, experts))
    w = rng.lognormal(0.0, 1.0, (layers, experts)) * 1000
    w[rng.random((layers, experts)) < 0.6] = 0.0  # mostly idle experts
    return w


def check_placement(p: np.ndarray, shape: tuple[int, int, int, int, int], layers: int) -> None:
    experts, replicas, groups, nodes, ranks = shape
    assert p.shape == (layers, replicas)
    assert p.dtype == np.int64
    assert ((p >= 0) & (p < experts)).all()
    for row in p:
        assert (np.bincount(row, minlength=experts) >= 1).all(), "an expert lost its replicas"
        if groups % nodes == 0:
            node_of_slot = np.arange(replicas) // (replicas // nodes)
            group_of_slot = row // (experts // groups)
            for g in range(groups):
                assert len(set(node_of_slot[group_of_slot == g].tolist())) == 1, "group split"
            for n in range(nodes):
                assert len(set(group_of_slot[node_of_slot == n].tolist())) == groups // nodes


def check_guard(w: np.ndarray, ours: np.ndarray, stock: np.ndarray, ranks: int, frac: float = 0.0):
    for layer in range(len(w)):
        a = np.sort(ref.rank_loads(w[layer], ours[layer], ranks))[::-1].cumsum()
        b = np.sort(ref.rank_loads(w[layer], stock[layer], ranks))[::-1].cumsum()
        assert (a <= b * (1 + frac) + EPS * b[-1]).all(), f"layer {layer}: {a - b}"


@pytest.mark.parametrize("shape", SHAPES)
def test_stock_is_deepseeks_algorithm(shape: tuple[int, int, int, int, int]) -> None:
    experts, replicas, groups, nodes, ranks = shape
    rng = np.random.default_rng(sum(shape))
    for kind in ("lognormal", "ties", "zeros", "sparse"):
        w = loads(rng, 3, experts, kind)
        got = placement.stock_rebalance_experts(torch.from_numpy(w), *shape[1:]).numpy()
        want = ref.stock(w, replicas, groups, nodes, ranks)
        np.testing.assert_array_equal(got, want, err_msg=kind)
        check_placement(got, shape, 3)


def test_stock_matches_the_reference_at_deepseek_v3_scale() -> None:
    rng = np.random.default_rng(3)
    w = rng.lognormal(0.0, 1.0, (2, 256)) * 1e4
    for replicas, nodes, ranks in ((288, 4, 32), (264, 1, 8)):
        got = placement.stock_rebalance_experts(w, replicas, 8, nodes, ranks).numpy()
        np.testing.assert_array_equal(got, ref.stock(w, replicas, 8, nodes, ranks))


def test_without_an_old_placement_ours_is_stock() -> None:
    w = torch.rand(4, 16) * 50
    np.testing.assert_array_equal(
        eplb_xfer.rebalance_experts(w, 24, 4, 2, 4).numpy(),
        placement.stock_rebalance_experts(w, 24, 4, 2, 4).numpy(),
    )


def drifted_case(
    rng: np.random.Generator, shape: tuple[int, int, int, int, int], kind: str, layers: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Loads and an old placement: stock's on drifted loads, or a random one with holes."""
    experts, replicas, groups, nodes, ranks = shape
    w = loads(rng, layers, experts, kind)
    if rng.random() < 0.5:
        old_w = w * rng.lognormal(0.0, 0.3, w.shape) + rng.integers(0, 3, w.shape)
        old = ref.stock(old_w, replicas, groups, nodes, ranks)
    else:
        old = rng.integers(-1, experts, (layers, replicas))
    return w, old


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["lognormal", "ties", "zeros", "sparse"])
def test_migration_aware_invariants(shape: tuple[int, int, int, int, int], kind: str) -> None:
    experts, replicas, groups, nodes, ranks = shape
    rng = np.random.default_rng([sum(shape), len(kind)])
    for _ in range(4):
        w, old = drifted_case(rng, shape, kind)
        stock = ref.stock(w, replicas, groups, nodes, ranks)
        ours = eplb_xfer.rebalance_experts(torch.from_numpy(w), *shape[1:], torch.from_numpy(old))
        assert ours.dtype == torch.int64 and ours.device.type == "cpu"
        p = ours.numpy()
        check_placement(p, shape, len(w))
        check_guard(w, p, stock, ranks)
        relabeled = placement.relabel_experts(w, *shape[1:], old).numpy()
        check_placement(relabeled, shape, len(w))
        for layer in range(len(w)):
            # Relabeling alone: exactly stock's loads, rank by rank up to renaming.
            np.testing.assert_allclose(
                np.sort(ref.rank_loads(w[layer], relabeled[layer], ranks)),
                np.sort(ref.rank_loads(w[layer], stock[layer], ranks)),
                rtol=1e-12,
                atol=1e-12,
            )
            moved = ref.experts_received(old[layer], p[layer], ranks)
            by_relabel = ref.experts_received(old[layer], relabeled[layer], ranks)
            assert moved <= by_relabel <= ref.experts_received(old[layer], stock[layer], ranks)
        # Deterministic: same bytes from the same input (every rank plans alone).
        again = eplb_xfer.rebalance_experts(w, *shape[1:], old)
        assert torch.equal(again, ours)


def test_max_imbalance_relaxes_the_guard_by_that_fraction() -> None:
    shape = (32, 48, 8, 4, 8)
    rng = np.random.default_rng(11)
    w, old = drifted_case(rng, shape, "lognormal", layers=4)
    stock = ref.stock(w, *shape[1:])
    strict = eplb_xfer.rebalance_experts(w, *shape[1:], old).numpy()
    loose = eplb_xfer.rebalance_experts(w, *shape[1:], old, max_imbalance=0.05).numpy()
    check_guard(w, loose, stock, shape[4], 0.05)
    moved = [
        sum(ref.experts_received(old[layer], p[layer], 8) for layer in range(4))
        for p in (strict, loose)
    ]
    assert moved[1] <= moved[0]


def test_unchanged_loads_move_nothing() -> None:
    shape = (32, 48, 8, 4, 8)
    w = np.random.default_rng(5).lognormal(0.0, 1.0, (3, 32))
    old = ref.stock(w, *shape[1:])
    ours = eplb_xfer.rebalance_experts(w, *shape[1:], old).numpy()
    assert all(ref.experts_received(old[layer], ours[layer], 8) == 0 for layer in range(3))


def test_drift_moves_far_fewer_experts_than_stock() -> None:
    shape = (256, 288, 8, 4, 32)  # DeepSeek-V3, EP32 on 4 nodes
    rng = np.random.default_rng(1)
    w0 = rng.lognormal(0.0, 1.0, (4, 256)) * 1000
    w1 = w0 * rng.lognormal(0.0, 0.1, w0.shape)
    old = placement.stock_rebalance_experts(w0, *shape[1:]).numpy()
    stock = ref.stock(w1, *shape[1:])
    ours = eplb_xfer.rebalance_experts(w1, *shape[1:], old).numpy()
    check_guard(w1, ours, stock, 32)
    moved_ours = sum(ref.experts_received(old[layer], ours[layer], 32) for layer in range(4))
    moved_stock = sum(ref.experts_received(old[layer], stock[layer], 32) for layer in range(4))
    assert moved_ours < 0.5 * moved_stock


def test_concurrent_callers_get_the_serial_results() -> None:
    """Python threads calling the policy at once (the GIL is released inside)
    get exactly what each call gives alone: no state shared between calls."""
    from concurrent.futures import ThreadPoolExecutor

    shape = (256, 288, 8, 4, 32)
    rng = np.random.default_rng(11)
    jobs = []
    for _ in range(8):
        w0 = rng.lognormal(0.0, 1.0, (6, 256)) * 1000
        old = placement.stock_rebalance_experts(w0, *shape[1:]).numpy()
        jobs.append((w0 * rng.lognormal(0.0, 0.3, w0.shape), old))
    alone = [eplb_xfer.rebalance_experts(w, *shape[1:], old).numpy() for w, old in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            futures = [
                pool.submit(eplb_xfer.rebalance_experts, w, *shape[1:], old) for w, old in jobs
            ]
            for f, want in zip(futures, alone, strict=True):
                assert np.array_equal(f.result().numpy(), want)


def test_accepts_vllm_style_inputs() -> None:
    # Integer token counts and int32 / int64 placements, as vLLM passes them.
    w = torch.randint(0, 10_000, (2, 16), dtype=torch.int64)
    old = placement.stock_rebalance_experts(w, 24, 4, 2, 4).to(torch.int32)
    out = eplb_xfer.rebalance_experts(w, 24, 4, 2, 4, old)
    assert out.shape == (2, 24) and out.dtype == torch.int64


def test_elastic_ep_maps_are_aligned_by_rank() -> None:
    # vLLM scale-down: the old map is wider (8 ranks of 6 slots, 4 survive);
    # before a scale-up it is narrower (2 ranks; the new ranks held nothing).
    w = np.random.default_rng(4).lognormal(0.0, 1.0, (2, 8))
    wide = placement.stock_rebalance_experts(w, 48, 4, 2, 8).numpy()
    np.testing.assert_array_equal(
        eplb_xfer.rebalance_experts(w, 24, 4, 2, 4, wide).numpy(),
        eplb_xfer.rebalance_experts(w, 24, 4, 2, 4, wide[:, :24]).numpy(),
    )
    narrow = placement.stock_rebalance_experts(w, 12, 4, 2, 2).numpy()
    padded = np.concatenate([narrow, np.full((2, 12), -1)], axis=1)
    np.testing.assert_array_equal(
        eplb_xfer.rebalance_experts(w, 24, 4, 2, 4, narrow).numpy(),
        eplb_xfer.rebalance_experts(w, 24, 4, 2, 4, padded).numpy(),
    )


def test_log2phy_logcnt_conventions() -> None:
    phy2log = torch.tensor([[0, 2, 0, 1, 2, 0], [1, 1, 0, 2, -1, 2]])
    log2phy, logcnt = eplb_xfer.log2phy_logcnt(phy2log, 4)
    assert logcnt.tolist() == [[3, 1, 2, 0], [1, 2, 2, 0]]
    # [layers, experts, max count], replica slots in slot order, -1 padding.
    assert log2phy.shape == (2, 4, 3)
    assert log2phy[0].tolist() == [[0, 2, 5], [3, -1, -1], [1, 4, -1], [-1, -1, -1]]
    assert log2phy[1].tolist() == [[2, -1, -1], [0, 1, -1], [3, 5, -1], [-1, -1, -1]]
    assert log2phy.dtype == logcnt.dtype == torch.int64


def test_log2phy_logcnt_inverts_a_placement() -> None:
    w = np.random.default_rng(2).lognormal(0.0, 1.0, (3, 32))
    p = placement.stock_rebalance_experts(w, 48, 8, 4, 8)
    log2phy, logcnt = eplb_xfer.log2phy_logcnt(p, 32)
    for layer in range(3):
        for e in range(32):
            slots = log2phy[layer, e, : logcnt[layer, e]].tolist()
            assert slots == np.flatnonzero(p[layer].numpy() == e).tolist()
            assert (log2phy[layer, e, logcnt[layer, e] :] == -1).all()


GOOD = dict(weight=np.ones((2, 16)), num_replicas=24, num_groups=4, num_nodes=2, num_ranks=4)


def call(**overrides: object) -> torch.Tensor:
    args = {**GOOD, **overrides}
    return eplb_xfer.rebalance_experts(**args)


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        (dict(weight=np.ones(16)), "weight"),
        (dict(weight=np.ones((2, 16, 1))), "weight"),
        (dict(weight=np.array([[1.0, -1.0] * 8] * 2)), "weight"),
        (dict(weight=np.array([[1.0, np.nan] * 8] * 2)), "weight"),
        (dict(weight=np.array([[1.0, np.inf] * 8] * 2)), "weight"),
        (dict(num_replicas=26), "num_replicas"),
        (dict(num_replicas=12), "num_replicas"),
        (dict(num_replicas=0), "num_replicas"),
        (dict(num_replicas=-4), "num_replicas"),
        (dict(num_ranks=0), "num_ranks"),
        (dict(num_ranks=3, num_replicas=24), "num_ranks"),
        (dict(num_nodes=0), "num_nodes"),
        (dict(num_groups=0), "num_groups"),
        (dict(num_groups=6, num_nodes=2), "num_groups"),
        (dict(old_global_expert_indices=np.zeros((2, 23), dtype=np.int64)), "old_global_expert"),
        (dict(old_global_expert_indices=np.zeros((3, 24), dtype=np.int64)), "old_global_expert"),
        (dict(old_global_expert_indices=np.zeros((24,), dtype=np.int64)), "old_global_expert"),
        (dict(old_global_expert_indices=np.full((2, 24), 16)), "old_global_expert_indices"),
        (dict(old_global_expert_indices=np.full((2, 24), -2)), "old_global_expert_indices"),
        (dict(max_imbalance=-0.5), "max_imbalance"),
        (dict(max_imbalance=float("nan")), "max_imbalance"),
    ],
)
def test_bad_values_raise_value_error_naming_the_argument(
    overrides: dict[str, object], name: str
) -> None:
    with pytest.raises(ValueError, match=f"^{name}"):
        call(**overrides)


def test_value_error_names_the_value() -> None:
    with pytest.raises(ValueError, match="^num_replicas: 26 is not a multiple of num_ranks 4$"):
        call(num_replicas=26)
    with pytest.raises(ValueError, match=r"^weight: load NaN at \[layer 0, expert 1\]"):
        call(weight=np.array([[1.0, np.nan] * 8] * 2))


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        (dict(weight=[[1.0] * 16] * 2), "weight"),
        (dict(weight=torch.ones(2, 16, dtype=torch.bool)), "weight"),
        (dict(weight=np.array([["a"] * 16] * 2)), "weight"),
        (dict(num_ranks=4.0), "num_ranks"),
        (dict(num_replicas=True), "num_replicas"),
        (dict(num_groups="4"), "num_groups"),
        (dict(num_nodes=None), "num_nodes"),
        (dict(old_global_expert_indices=np.zeros((2, 24))), "old_global_expert_indices"),
        (dict(old_global_expert_indices="0"), "old_global_expert_indices"),
        (dict(max_imbalance="0.1"), "max_imbalance"),
    ],
)
def test_bad_types_raise_type_error_naming_the_argument(
    overrides: dict[str, object], name: str
) -> None:
    with pytest.raises(TypeError, match=f"^{name}"):
        call(**overrides)


def test_demo_policy_plans_placements_and_reports_bytes_per_rebalance(capsys) -> None:
    from eplb_xfer import cli
    from eplb_xfer.demo import DemoConfig, policy_placements

    argv = ["demo", "--ranks", "2", "--layers", "2", "--backend", "torch", "--no-progress"]
    assert cli.main([*argv, "--policy", "ours", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "byte-exact" in out and "policy ours: rebalance 2:" in out
    # Ours moves fewer experts than stock on the same drifting loads.
    moved = {}
    for policy in ("stock", "ours"):
        p = policy_placements(DemoConfig(ranks=8, layers=4, repeat=3, policy=policy))
        moved[policy] = sum(
            ref.experts_received(a[layer], b[layer], 8)
            for a, b in zip(p, p[1:])
            for layer in range(4)
        )
    assert moved["ours"] < moved["stock"]


def test_demo_policy_refuses_empty_slots(capsys) -> None:
    from eplb_xfer import cli

    assert cli.main(["demo", "--policy", "ours", "--empty-slots", "1"]) != 0
    assert "--empty-slots" in capsys.readouterr().err
