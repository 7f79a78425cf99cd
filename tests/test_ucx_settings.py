"""UCX settings under which NIXL cannot move bytes fail at set-up, on every
rank, naming the settings; ``direction="auto"`` avoids what cannot work."""

from __future__ import annotations

import workers

TCP_NO_EMULATION = {"UCX_TLS": "tcp", "UCX_PROTO_EMULATION_ENABLE": "n"}


def test_tcp_only_moves_rows_by_write(world):
    """With cma excluded, rows inside a node move by WRITE: no GET emulation."""
    for r in world(workers.set_up_under, 2, "auto", env={"UCX_TLS": "tcp"}):
        assert r["kind"] == "ok", r
        assert r["errors"] == []


def test_auto_works_where_read_cannot(world):
    for r in world(workers.set_up_under, 2, "auto", env=TCP_NO_EMULATION):
        assert r["kind"] == "ok", r
        assert r["errors"] == []


def test_forced_read_without_get_fails_at_set_up_naming_the_settings(world):
    for r in world(workers.set_up_under, 2, "read", env=TCP_NO_EMULATION):
        assert r["kind"] == "TransferError" and r["layer"] == -1 and r["blame"] == "setup", r
        assert "UCX_PROTO_EMULATION_ENABLE=n" in r["msg"] and "UCX_TLS=tcp" in r["msg"], r
        assert r["elapsed"] < 10.0, r
        assert r["agents"] == 0  # nothing leaked
        assert r["buffer_untouched"]  # the 8 test bytes were put back
