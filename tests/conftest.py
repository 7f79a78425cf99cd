"""Shared pytest fixtures: spawned multi-process worlds on CPU, the NIXL shim."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import `workers`, `harness`

QUIET_UCX = {"UCX_WARN_UNUSED_ENV_VARS": "n", "UCX_LOG_LEVEL": "fatal"}


@pytest.fixture(scope="session", autouse=True)
def nixl_shim(tmp_path_factory):
    """Builds the fault-injection shim once; ranks find it via EPLBX_SHIM_PATH."""
    from harness import build_shim

    path = build_shim(str(tmp_path_factory.mktemp("shim")))
    os.environ["EPLBX_SHIM_PATH"] = path
    return path


@pytest.fixture
def world():
    """Runs a `workers` function on N spawned ranks: world(fn, n, *args, **fn_kwargs)."""
    import functools

    from eplb_xfer._spawn import spawn_ranks

    spawn_keys = {"wait_for", "pids", "destroy_group"}

    def run(fn, n, *args, timeout_s=180.0, allow_failures=False, env=None, **kw):
        spawn_kw = {k: v for k, v in kw.items() if k in spawn_keys}
        fn_kw = {k: v for k, v in kw.items() if k not in spawn_keys}
        return spawn_ranks(
            functools.partial(fn, **fn_kw) if fn_kw else fn,
            n,
            *args,
            timeout_s=timeout_s,
            allow_failures=allow_failures,
            env={**QUIET_UCX, **(env or {})},
            **spawn_kw,
        )

    return run
