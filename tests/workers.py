"""Rank functions run in spawned processes by the tests (must be importable)."""

from __future__ import annotations

import numpy as np
import torch

import eplb_xfer
from eplb_xfer._tensors import copy_rows, copy_runs
from eplb_xfer.testing import (
    TensorSpec,
    build_weights,
    random_placement,
    snapshot,
    unchanged_layers,
    verify,
)

MIXED = [
    TensorSpec("w13", torch.uint8, (8, 12)),
    TensorSpec("s13", torch.float32, (2, 3)),
    TensorSpec("b13", torch.bfloat16, (5,)),
    TensorSpec("w2", torch.uint8, (12, 4)),
]


def scenario(seed: int, world: int, layers: int, n_local: int, empty: int = 1, experts=None):
    rng = np.random.default_rng(seed)
    num_slots = world * n_local
    num_experts = experts or max(1, num_slots - world - empty)
    old = random_placement(rng, layers, num_experts, num_slots, empty)
    new = random_placement(rng, layers, num_experts, num_slots, empty)
    return old, new, num_experts


def make_comm(
    backend: str, weights, buffer, mode: str = "zero_copy", timeout_s: float = 30.0, verify=False
):
    if backend == "torch":
        return eplb_xfer.create_communicator("torch", None, weights, buffer)
    return eplb_xfer.create_communicator(
        "nixl", None, weights, buffer, mode=mode, timeout_s=timeout_s, verify=verify
    )


def rebalance_cases(
    rank: int, world: int, backend: str, mode: str, seeds: list[int], verify_sums: bool = False
):
    """Several random rebalances through the driver; returns mismatch lists."""
    report = []
    for seed in seeds:
        layers = 1 + seed % 3
        n_local = 2 + seed % 3
        old, new, E = scenario(seed, world, layers, n_local, empty=seed % 2)
        if seed % 5 == 0:
            new = old.copy()  # the no-change case
        weights, buffer = build_weights(MIXED, old, rank, world, E, seed)
        comm = make_comm(backend, weights, buffer, mode, verify=verify_sums)
        try:
            stats = eplb_xfer.rearrange_expert_weights_inplace(
                old, new, weights, buffer, None, comm
            )
        finally:
            comm.close()
        errs = verify(MIXED, weights, old, new, rank, world, E, seed)
        assert stats.layers == len(stats.layer_seconds) == layers
        assert stats.bytes_received == sum(stats.per_peer_bytes.values())
        report.append((seed, errs, stats.experts_received, comm.staging_bytes))
    return report


def vllm_style_cases(
    rank: int, world: int, mode: str, seeds: list[int], pass_old: bool, verify_sums: bool = False
):
    """Drives a NixlCommunicator the way vLLM's EPLB driver does: per layer
    set_transfer_context, add_send/add_recv per expert, execute(), then the
    caller commits the buffer. Returns mismatch lists and counters."""
    report = []
    for seed in seeds:
        old, new, E = scenario(seed, world, 2, 3, empty=1)
        weights, buffer = build_weights(MIXED, old, rank, world, E, seed)
        comm = eplb_xfer.NixlCommunicator(
            None, weights, buffer, mode=mode, timeout_s=30.0, verify=verify_sums
        )
        plan = eplb_xfer.plan_rebalance(old, new, world)
        for layer in range(old.shape[0]):
            w = weights[layer]
            copy_rows(buffer, w, [(s, d) for _e, s, d in plan.local_copies(layer, rank)])
            if not pass_old:
                comm.set_transfer_context(torch.from_numpy(old), layer)
            else:
                comm.set_transfer_context(old[layer], layer)
            for e, src_row, readers in plan.sends(layer, rank):
                for r in readers:
                    comm.add_send([t[src_row] for t in w], r, e)
            for e, src, _src_row, dst in plan.recvs(layer, rank):
                comm.add_recv([b[dst] for b in buffer], src, e)
            if pass_old:
                comm.execute(old_indices=old[layer])
            else:
                comm.execute()
            copy_rows(buffer, buffer, [(s, d) for _e, s, d in plan.dup_fills(layer, rank)])
            copy_runs(w, buffer, plan.changed_runs(layer, rank))
        errs = verify(MIXED, weights, old, new, rank, world, E, seed)
        report.append((seed, errs, comm.staging_bytes, comm.exchanges))
        comm.close()
    return report


def repeated_rebalances(rank: int, world: int, mode: str, rounds: int):
    """One communicator, several rebalances: prepared lists are built once."""
    seed = 100
    old, _, E = scenario(seed, world, 2, 3, empty=0)
    weights, buffer = build_weights(MIXED, old, rank, world, E, seed)
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, mode=mode, timeout_s=30.0)
    built_after_setup = comm.prepared_lists_built
    rng = np.random.default_rng(seed + 1)
    errors = []
    cur = old
    from eplb_xfer.testing import random_placement

    for _ in range(rounds):
        nxt = random_placement(rng, cur.shape[0], E, cur.shape[1], 0)
        eplb_xfer.rearrange_expert_weights_inplace(cur, nxt, weights, buffer, None, comm)
        errors += verify(MIXED, weights, old, nxt, rank, world, E, seed)
        cur = nxt
    out = (
        built_after_setup,
        comm.prepared_lists_built,
        comm.staging_bytes,
        errors,
        comm.node_of_rank,
    )
    comm.close()
    return out


def bad_input_then_reuse(rank: int, world: int, backend: str, mode: str):
    """Bad calls raise before anything moves; the communicator stays usable."""
    seed = 7
    old, new, E = scenario(seed, world, 2, 3, empty=1)
    weights, buffer = build_weights(MIXED, old, rank, world, E, seed)
    snapshot = [[t.clone() for t in layer] for layer in weights]
    comm = make_comm(backend, weights, buffer, mode)
    caught = []

    def expect(exc_type, fn):
        try:
            fn()
        except exc_type as e:
            caught.append(str(e))
            return
        raise AssertionError(f"expected {exc_type.__name__}")

    run = eplb_xfer.rearrange_expert_weights_inplace
    expect(ValueError, lambda: run(old[:1], new, weights, buffer, None, comm))
    expect(ValueError, lambda: run(old, new[:, :-1], weights, buffer, None, comm))
    bad = new.copy()
    bad[0, 0] = -5
    expect(ValueError, lambda: run(old, bad, weights, buffer, None, comm))
    missing = new.copy()
    missing[1, 0] = E + 50  # no slot of old holds it
    expect(ValueError, lambda: run(old, missing, weights, buffer, None, comm))
    expect(TypeError, lambda: run(old.astype(np.float32), new, weights, buffer, None, comm))
    expect(ValueError, lambda: run(old, new, weights[:1], buffer, None, comm))
    expect(ValueError, lambda: run(old, new, weights, buffer[:2], None, comm))
    if backend == "nixl":
        clones = [[t.clone() for t in layer] for layer in weights]
        expect(ValueError, lambda: run(old, new, clones, buffer, None, comm))  # not registered
        expect(ValueError, lambda: comm.add_recv([t[0] for t in weights[0]], 0, 1))
        expect(ValueError, lambda: comm.add_send([buffer[0][0]], 0, 1))
        expect(ValueError, lambda: comm.add_recv([b[0] for b in buffer], world + 3, 1))
        expect(ValueError, lambda: comm.execute())  # no transfer context yet
        n_local = old.shape[1] // world
        mine = [int(e) for e in old[0, rank * n_local : (rank + 1) * n_local] if e >= 0]
        comm.set_transfer_context(old[0], 0)
        comm.add_send([b[0] for b in buffer], (rank + 1) % world, mine[0])
        expect(ValueError, lambda: comm.execute())  # zero-copy sends must be weight rows
        comm.set_transfer_context(old[0], 0)
        comm.add_recv([b[0] for b in buffer], (rank + 1) % world, E + 99)
        expect(ValueError, lambda: comm.execute())  # the source does not hold it
    untouched = all(torch.equal(a, b) for la, lb in zip(weights, snapshot) for a, b in zip(la, lb))
    run(old, new, weights, buffer, None, comm)
    errs = verify(MIXED, weights, old, new, rank, world, E, seed)
    comm.close()
    return untouched, errs, caught


def nixl_unloadable(rank: int, world: int, lib_path: str):
    """A missing or foreign library gives NixlUnavailable, not an abort."""
    weights, buffer = build_weights(MIXED, np.array([[0, 1]]), rank, world, 2, 0)
    try:
        eplb_xfer.NixlCommunicator(None, weights, buffer, lib_path=lib_path)
    except eplb_xfer.NixlUnavailable as e:
        return str(e)
    return None


def dead_peer(rank: int, world: int, mode: str, victim: int, how: str, layer: int):
    """``victim`` dies or hangs at a chosen point of a 4-layer rebalance in
    which every layer moves; survivors report what they saw.

    ``how``: ``exit_after_setup`` / ``hang_after_setup`` (before the
    rebalance), ``exit_after_layer`` (after committing ``layer``), or one of
    the engine's fault points ``exit_before_ready``, ``hang_before_done``,
    ``exit_mid_done`` (DONE of ``layer`` reaches only the lowest peer).
    """
    import os
    import time

    seed = 11
    rng = np.random.default_rng(seed)
    n_local, L = 3, 4
    E = world * n_local - world
    old = random_placement(rng, L, E, world * n_local, 0)
    new = np.roll(old, n_local, axis=1)  # every rank gets another rank's experts
    weights, buffer = build_weights(MIXED, old, rank, world, E, seed)
    snap = snapshot(weights)
    if rank == victim and how in ("exit_before_ready", "hang_before_done", "exit_mid_done"):
        os.environ["EPLB_XFER_FAULT"] = f"{how}:{layer}"
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, mode=mode, timeout_s=3.0)
    torch.distributed.barrier()  # every rank finished set-up
    if rank == victim:
        if how == "exit_after_setup":
            os._exit(17)
        if how == "hang_after_setup":
            time.sleep(3600)

    def on_layer(done: int) -> None:
        if rank == victim and how == "exit_after_layer" and done == layer:
            os._exit(17)

    t0 = time.monotonic()
    try:
        eplb_xfer.rearrange_expert_weights_inplace(
            old, new, weights, buffer, None, comm, on_layer=on_layer
        )
        outcome = ("no error", None, None, None, "")
    except eplb_xfer.TransferError as e:
        outcome = ("TransferError", e.peer, e.layer, e.committed_layers, str(e))
    elapsed = time.monotonic() - t0
    committed = outcome[3] or []
    errs = verify(MIXED, weights, old, new, rank, world, E, seed, layers=committed)
    untouched = set(unchanged_layers(weights, snap)) >= set(range(L)) - set(committed)
    counters = comm.counters
    try:  # a failed communicator refuses further work instead of timing out again
        eplb_xfer.rearrange_expert_weights_inplace(old, new, weights, buffer, None, comm)
        reuse = "no error"
    except RuntimeError as e:
        reuse = f"{type(e).__name__}: {e}"
    comm.close()
    from eplb_xfer import _core

    return {
        "kind": outcome[0],
        "peer": outcome[1],
        "layer": outcome[2],
        "committed": committed,
        "msg": outcome[4],
        "errors": errs,
        "untouched": untouched,
        "elapsed": elapsed,
        "requests_live": counters["requests_live"],
        "failed_peers": counters["failed_peers"],
        "live_agents_after_close": _core.live_agents(),
        "reuse": reuse,
    }


def corrupt_source(rank: int, world: int, mode: str, culprit: int, layer: int):
    """With ``verify=True``, ``culprit`` changes a row it serves at ``layer``
    after hashing it (test-only fault ``corrupt_send``). Every rank must raise
    TransferError naming the culprit at that layer; no rank commits it."""
    import os

    seed = 13
    rng = np.random.default_rng(seed)
    n_local, L = 3, 3
    E = world * n_local - world
    old = random_placement(rng, L, E, world * n_local, 0)
    new = np.roll(old, n_local, axis=1)
    weights, buffer = build_weights(MIXED, old, rank, world, E, seed)
    snap = snapshot(weights)
    if rank == culprit:
        os.environ["EPLB_XFER_FAULT"] = f"corrupt_send:{layer}"
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, mode=mode, timeout_s=10.0, verify=True)
    try:
        eplb_xfer.rearrange_expert_weights_inplace(old, new, weights, buffer, None, comm)
        outcome = ("no error", None, None, [], "")
    except eplb_xfer.TransferError as e:
        outcome = ("TransferError", e.peer, e.layer, e.committed_layers, str(e))
    finally:
        comm.close()
    committed = outcome[3]
    errs = verify(MIXED, weights, old, new, rank, world, E, seed, layers=committed)
    untouched = set(unchanged_layers(weights, snap)) >= set(range(L)) - set(committed)
    return outcome, errs, untouched
