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


@pytest.mark.parametrize("lib", ["/nonexistent/libnixl_capi.so", "libm.so.6"])
def test_unloadable_nixl_is_a_python_exception(world, lib):
    (msg,) = world(workers.nixl_unloadable, 1, lib)
    assert msg is not None and "NIXL" in msg
