"""Bad input and failing peers."""

from __future__ import annotations

import pytest
import workers

import eplb_xfer


@pytest.mark.parametrize(("backend", "mode"), [("torch", ""), ("nixl", "zero_copy")])
def test_bad_input_raises_before_bytes_move_and_comm_stays_usable(world, backend, mode):
    for untouched, errors, caught in world(workers.bad_input_then_reuse, 2, backend, mode):
        assert untouched
        assert errors == []
        assert all(caught)  # every message says something


def test_bad_mode_and_options_are_rejected():
    with pytest.raises(ValueError, match="backend"):
        eplb_xfer.create_communicator("carrier-pigeon", None, [], [])


@pytest.mark.parametrize("mode", ["zero_copy", "staged"])
def test_dead_peer_raises_transfer_error_and_leaves_uncommitted_layers(world, mode):
    results = world(
        workers.peer_dies_mid_rebalance,
        3,
        mode,
        2,
        allow_failures=True,
        timeout_s=120.0,
        env={"EPLB_XFER_NO_DESTROY": "1"},
    )
    assert isinstance(results[2], Exception)  # the victim
    for rank in (0, 1):
        kind, peer, layer, committed, errors, elapsed, msg = results[rank]
        assert kind == "TransferError"
        assert layer == 1
        assert committed == [0]
        assert peer == 2, msg
        assert errors == []  # layer 0 applied, layers 1.. untouched
        assert elapsed < 60


@pytest.mark.parametrize("lib", ["/nonexistent/libnixl_capi.so", "libm.so.6"])
def test_unloadable_nixl_is_a_python_exception(world, lib):
    (msg,) = world(workers.nixl_unloadable, 1, lib)
    assert msg is not None and "NIXL" in msg
