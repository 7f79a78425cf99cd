"""Unloadable NIXL and unknown backends."""

from __future__ import annotations

import pytest
import workers

import eplb_xfer


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        eplb_xfer.create_communicator("carrier-pigeon", None, [], [])


@pytest.mark.parametrize("lib", ["/nonexistent/libnixl_capi.so", "libm.so.6"])
def test_unloadable_nixl_is_a_python_exception(world, lib):
    (msg,) = world(workers.nixl_unloadable, 1, lib)
    assert msg is not None and "NIXL" in msg
