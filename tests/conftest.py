"""Shared pytest fixtures: spawned multi-process worlds on CPU."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import `workers`

QUIET_UCX = {"UCX_WARN_UNUSED_ENV_VARS": "n", "UCX_LOG_LEVEL": "fatal"}


@pytest.fixture
def world():
    """Runs a `workers` function on N spawned ranks: world(fn, n, *args)."""
    from eplb_xfer._spawn import spawn_ranks

    def run(fn, n, *args, timeout_s=180.0, allow_failures=False, env=None, **kw):
        return spawn_ranks(
            fn,
            n,
            *args,
            timeout_s=timeout_s,
            allow_failures=allow_failures,
            env={**QUIET_UCX, **(env or {})},
            **kw,  # wait_for, pids
        )

    return run
