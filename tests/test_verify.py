"""``verify=True``: every received expert is checked against its source's checksum."""

from __future__ import annotations

import pytest
import workers


@pytest.mark.parametrize("mode", ["zero_copy", "staged"])
def test_verified_rebalances_are_byte_exact(world, mode):
    reports = world(workers.rebalance_cases, 3, "nixl", mode, [1, 2, 3], True)
    received = 0
    for rank_report in reports:
        for seed, errors, got, _staging in rank_report:
            assert errors == [], f"seed {seed}: {errors[:3]}"
            received += got
    assert received > 0


@pytest.mark.parametrize("mode", ["zero_copy", "staged"])
def test_verified_vllm_call_style(world, mode):
    for rank_report in world(workers.vllm_style_cases, 2, mode, [21, 22], False, True):
        for seed, errors, _staging, exchanges in rank_report:
            assert errors == [], f"seed {seed}: {errors[:3]}"
            assert exchanges == 2


@pytest.mark.parametrize("mode", ["zero_copy", "staged"])
def test_corrupted_source_row_fails_the_layer_everywhere(world, mode):
    culprit, layer = 1, 1
    for rank, (outcome, errors, untouched) in enumerate(
        world(workers.corrupt_source, 3, mode, culprit, layer)
    ):
        kind, peer, failed, committed, msg = outcome
        assert kind == "TransferError", (rank, outcome)
        assert peer == culprit, msg
        assert failed == layer, msg
        assert committed == [0], msg
        assert errors == []
        assert untouched  # the failed layer and later ones are bit-identical
    assert "checksum mismatch" in msg or "aborted" in msg


def test_checksums_see_flipped_and_swapped_bytes():
    import torch

    from eplb_xfer._tensors import row_checksums

    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, 256, (4, 8, 16), dtype=torch.uint8, generator=g)
    s = torch.randn(4, 5, generator=g).to(torch.bfloat16)
    base = row_checksums([w, s], range(4))
    assert len(set(base)) == 4
    flipped = w.clone()
    flipped[2, 3, 4] ^= 1
    assert row_checksums([flipped, s], [2]) != [base[2]]
    swapped = w.clone()
    swapped[1, 0], swapped[1, 1] = w[1, 1].clone(), w[1, 0].clone()
    if not torch.equal(swapped, w):
        assert row_checksums([swapped, s], [1]) != [base[1]]
    # the same bytes give the same checksum whatever the dtype and stride
    view = torch.empty(4, 2, 8, 16, dtype=torch.uint8)[:, 0]
    view.copy_(w)
    assert row_checksums([view, s], range(4)) == base


def test_host_and_torch_checksums_agree():
    import torch

    from eplb_xfer._tensors import _torch_expert_checksums, expert_checksums

    g = torch.Generator().manual_seed(1)
    shapes = [(7,), (10,), (3, 4096), (5, 8192 + 6), (2, 3)]
    rows = [torch.randint(0, 256, s, dtype=torch.uint8, generator=g) for s in shapes]
    f32 = torch.randn(6, 33, generator=g)
    experts = [rows, [f32[0], rows[1]], [f32[5]], [torch.zeros(4096, dtype=torch.uint8)]]
    assert expert_checksums(experts) == _torch_expert_checksums(experts)
    assert len(set(expert_checksums(experts))) == len(experts)
