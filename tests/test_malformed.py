"""Every malformed call in ``malformed.CASES`` raises the right exception,
naming the argument, before anything moves; communicators stay usable."""

from __future__ import annotations

import malformed
import pytest


@pytest.fixture(scope="module")
def outcomes():
    from conftest import QUIET_UCX

    from eplb_xfer._spawn import spawn_ranks

    return spawn_ranks(malformed.run_all, 2, timeout_s=300.0, env=QUIET_UCX)


@pytest.mark.parametrize(
    ("name", "exc", "text"),
    [c[:3] for c in malformed.CASES],
    ids=[c[0] for c in malformed.CASES],
)
def test_malformed_call(outcomes, name, exc, text):
    for rank, out in enumerate(outcomes):
        kind, msg, unchanged = out[name]
        assert kind == exc.__name__, f"rank {rank}: {kind}: {msg}"
        assert text in msg, f"rank {rank}: message does not name {text!r}: {msg}"
        assert unchanged, f"rank {rank}: a tensor changed"


def test_communicators_still_work_after_every_malformed_call(outcomes):
    for out in outcomes:
        assert out["__reuse__"] == []


def test_case_names_are_unique():
    names = [c[0] for c in malformed.CASES]
    assert len(names) == len(set(names))
