"""``verify=True``: every received expert is checked against its source's
checksum before any rank may commit the layer."""

from __future__ import annotations

import pytest
import torch
import workers

from eplb_xfer import _core
from eplb_xfer._tensors import expert_checksums


@pytest.mark.parametrize("mode", ["zero_copy", "staged"])
def test_verified_rebalances_are_byte_exact(world, mode):
    reports = world(workers.rebalance_cases, 3, "nixl", [1, 2, 3], mode=mode, verify=True)
    for rank_report in reports:
        for case in rank_report:
            assert case["errors"] == [], case["errors"][:3]


@pytest.mark.parametrize("mode", ["zero_copy", "staged"])
def test_data_corrupted_in_flight_fails_the_layer_everywhere(world, mode):
    """Rank 0's first completed READ of layer 1 is corrupted after it landed:
    every rank raises naming a source rank 0 read from, at layer 1, and no
    rank commits layer 1."""
    results = world(workers.corrupt_read, 3, mode, 0, 3)
    peers = {r["peer"] for r in results}
    assert len(peers) == 1, results  # everyone names the same rank
    for r in results:
        assert r["kind"] == "TransferError", r
        assert r["blame"] == "checksum", r
        assert r["layer"] == 1 and r["committed"] == [0], r
        assert r["errors"] == [] and r["untouched"], r
    assert results[0]["peer"] != 0


def test_host_and_device_checksums_agree_and_see_changes():
    g = torch.Generator().manual_seed(1)
    shapes = [(7,), (10,), (3, 4096), (5, 8192 + 6), (2, 3)]
    rows = [torch.randint(0, 256, s, dtype=torch.uint8, generator=g) for s in shapes]
    f32 = torch.randn(6, 33, generator=g)
    experts = [rows, [f32[0], rows[1]], [f32[5]], [torch.zeros(4096, dtype=torch.uint8)]]
    host = expert_checksums(experts)
    assert len(set(host)) == len(experts)
    parts = []
    for rows_ in experts:
        p = []
        for r in rows_:
            b = r.reshape(-1).view(torch.uint8)
            c = _core.checksum_block_width(b.numel())
            blocks = b.view(-1, c).to(torch.int64)
            by_block = blocks.sum(1)
            by_col = blocks.sum(0)
            w_b = torch.arange(1, by_block.numel() + 1)
            w_c = torch.arange(1, c + 1)
            p.append(
                (
                    int(by_block.sum()),
                    int((by_block * w_b).sum()) & (2**64 - 1),
                    int((by_col * w_c).sum()) & (2**64 - 1),
                )
            )
        parts.append(p)
    assert _core.checksums_from_parts(parts) == host
    flipped = [r.clone() for r in rows]
    flipped[2][1, 5] ^= 1
    assert expert_checksums([flipped])[0] != host[0]
