"""Rank functions for the emulated multi-host tests (``test_hosts.py``).

They run inside emulated hosts (``emulated_hosts.EmulatedHosts.run``), so they
must be importable and must not create namespaces themselves. Row contents come
from an oracle of their own (:func:`oracle_row`), independent of
the product's demo helpers: every (layer, tensor, expert) row is seeded random
bytes, every empty slot a filler unique to (layer, tensor, slot).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: (name, dtype, row shape) of the stacked weight tensors: mixed dtypes and sizes.
SPECS: list[tuple[str, torch.dtype, tuple[int, ...]]] = [
    ("w13", torch.uint8, (128, 96)),
    ("s13", torch.float32, (4, 3)),
    ("b13", torch.bfloat16, (40,)),
    ("w2", torch.uint8, (96, 64)),
]


def row_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()


def oracle_row(seed: int, layer: int, tensor: int, expert: int, nbytes: int) -> np.ndarray:
    """The bytes of ``expert``'s row of ``tensor`` at ``layer`` (uint8)."""
    rng = np.random.default_rng([seed, layer, tensor, expert])
    return np.frombuffer(rng.bytes(nbytes), dtype=np.uint8)


def filler_row(seed: int, layer: int, tensor: int, slot: int, nbytes: int) -> np.ndarray:
    """The bytes of empty (-1) ``slot`` (kept by a rebalance that leaves it empty)."""
    return oracle_row(seed, layer, tensor, 1_000_000 + slot, nbytes)


def _u8(t: torch.Tensor) -> np.ndarray:
    return t.reshape(t.shape[0], -1).view(torch.uint8).numpy()


Spec = tuple[str, torch.dtype, tuple[int, ...]]


def build(
    old: np.ndarray, rank: int, world: int, seed: int, specs: Sequence[Spec] = SPECS
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """This rank's weight rows per ``old`` (from the oracle) and an empty buffer."""
    num_layers, num_slots = old.shape
    n_local = num_slots // world
    weights = []
    for layer in range(num_layers):
        tensors = []
        for ti, (_name, dtype, shape) in enumerate(specs):
            w = torch.empty((n_local, *shape), dtype=dtype)
            nb = row_nbytes(dtype, shape)
            wb = _u8(w)
            for r in range(n_local):
                slot = rank * n_local + r
                e = int(old[layer, slot])
                wb[r] = (
                    oracle_row(seed, layer, ti, e, nb)
                    if e >= 0
                    else filler_row(seed, layer, ti, slot, nb)
                )
            tensors.append(w)
        weights.append(tensors)
    buffer = [torch.empty((n_local, *shape), dtype=dtype) for _n, dtype, shape in specs]
    return weights, buffer


def check(
    weights: Sequence[Sequence[torch.Tensor]],
    old: np.ndarray,
    new: np.ndarray,
    rank: int,
    world: int,
    seed: int,
    layers: Sequence[int] | None = None,
    specs: Sequence[Spec] = SPECS,
) -> list[str]:
    """Byte-exact check of this rank's rows after a rebalance ``old -> new``
    that started from rows built by :func:`build` from ``old``: layers in
    ``layers`` (default all) must hold ``new`` (a slot that becomes -1 keeps
    what it held), the others ``old``."""
    num_layers, num_slots = old.shape
    n_local = num_slots // world
    done = set(range(num_layers)) if layers is None else set(layers)
    errors = []
    for layer in range(num_layers):
        for ti, (name, dtype, shape) in enumerate(specs):
            nb = row_nbytes(dtype, shape)
            wb = _u8(weights[layer][ti])
            for r in range(n_local):
                slot = rank * n_local + r
                e = int((new if layer in done else old)[layer, slot])
                if e < 0:
                    e = int(old[layer, slot])
                want = oracle_row(seed, layer, ti, e, nb) if e >= 0 else None
                if want is None:
                    want = filler_row(seed, layer, ti, slot, nb)
                if not np.array_equal(wb[r], want):
                    errors.append(f"rank {rank} layer {layer} {name} row {r}: expected expert {e}")
    return errors


def placements(seed: int, world: int, n_local: int, layers: int) -> tuple[np.ndarray, np.ndarray]:
    """``old``/``new`` ``[layers, world*n_local]``: every expert present, a few
    replicated on both hosts, one empty slot, every rank's rows changing."""
    rng = np.random.default_rng(seed)
    num_slots = world * n_local
    experts = num_slots - 4
    out = []
    for _ in range(2):
        rows = []
        for _layer in range(layers):
            hot = rng.choice(experts, size=3, replace=False)
            row = np.concatenate([np.arange(experts), hot, [-1]])
            rows.append(rng.permutation(row))
        out.append(np.array(rows, dtype=np.int64))
    return out[0], out[1]


def holders(old: np.ndarray, layer: int, expert: int, world: int) -> set[int]:
    n_local = old.shape[1] // world
    return {r for r in range(world) if expert in old[layer, r * n_local : (r + 1) * n_local]}


def rebalance_across_hosts(rank: int, world: int, seed: int, nodes: list[int]) -> dict[str, Any]:
    """Two rebalances through one NIXL communicator: ``old -> new`` with an
    explicit ``node_of_rank=nodes``, then ``new -> old`` with the topology the
    communicator detected (kernel boot id and PID namespace). Checks bytes after each, and which
    source each received expert came from."""
    import eplb_xfer

    n_local, num_layers = 4, 3
    old, new = placements(seed, world, n_local, num_layers)
    weights, buffer = build(old, rank, world, seed)
    row_bytes = sum(row_nbytes(d, s) for _n, d, s in SPECS)
    comm = eplb_xfer.create_communicator("nixl", None, weights, buffer, timeout_s=20.0)
    learned = list(comm.node_of_rank)  # type: ignore[attr-defined]
    directions = list(comm.directions)  # type: ignore[attr-defined]
    try:
        stats = eplb_xfer.rearrange_expert_weights_inplace(
            old, new, weights, buffer, None, comm, node_of_rank=nodes
        )
        errors_forward = check(weights, old, new, rank, world, seed)
        stats_back = eplb_xfer.rearrange_expert_weights_inplace(
            new, old, weights, buffer, None, comm
        )
        # Built from old, so empty slots of old still hold their filler unless
        # new filled them; then new -> old keeps new's expert there.
        errors_back = check(weights, new, old, rank, world, seed)
    finally:
        comm.close()
    # Which source served each expert this rank received, per the plan the
    # driver followed, and whether a same-host holder existed.
    plan = eplb_xfer.plan_rebalance(old, new, world, node_of_rank=nodes)
    reads = []
    planned_bytes: dict[int, int] = {}
    for layer in range(num_layers):
        for expert, src, _src_row, _dst_row in plan.recvs(layer, rank):
            others = holders(old, layer, expert, world) - {rank}
            reads.append(
                {
                    "layer": layer,
                    "expert": expert,
                    "src": src,
                    "same_host_holders": sorted(h for h in others if nodes[h] == nodes[rank]),
                    "other_host_holders": sorted(h for h in others if nodes[h] != nodes[rank]),
                }
            )
            planned_bytes[src] = planned_bytes.get(src, 0) + row_bytes
    # The oracle must be able to fail: one flipped byte is reported.
    probe = [[t.clone() for t in layer] for layer in weights]
    _u8(probe[0][0])[0, 0] ^= 0xFF
    oracle_catches = len(check(probe, new, old, rank, world, seed)) == 1
    return {
        "learned_nodes": learned,
        "directions": directions,
        "errors_forward": errors_forward,
        "errors_back": errors_back,
        "reads": reads,
        "per_peer_bytes": dict(stats.per_peer_bytes),
        "planned_bytes": planned_bytes,
        "bytes_back": stats_back.bytes_received,
        "oracle_catches": oracle_catches,
    }


def rebalance_with_fault(
    rank: int,
    world: int,
    seed: int,
    trigger_rank: int,
    marker: str,
    timeout_s: float,
    at_start: bool = False,
    row_scale: int = 1,
) -> dict[str, Any]:
    """A 4-layer rebalance in which every layer moves, over NIXL with
    ``timeout_s``; after committing layer 0, ``trigger_rank`` signals
    ``marker`` (the controller then kills a host or takes the link down) and
    waits until that was done (a rank of a killed host just waits to die).
    With ``at_start``, it signals right before the rebalance instead and goes
    on (the fault then lands at a moment the action's ``delay_s`` picks).
    ``row_scale`` multiplies the rows of the first tensor (a longer rebalance).

    Reports (also as a partial result, before ``close()``): the error raised,
    seconds to it, whether committed layers hold the new placement and every
    other layer the old one; then closes the communicator and reports how long
    ``close()`` took.
    """
    import emulated_hosts

    import eplb_xfer

    n_local, num_layers = 3, 4
    num_slots = world * n_local
    rng = np.random.default_rng(seed)
    old = np.array([rng.permutation(num_slots) for _ in range(num_layers)], dtype=np.int64)
    new = np.roll(old, n_local, axis=1)  # every rank takes its neighbour's experts
    specs = list(SPECS)
    name, dtype, shape = specs[0]
    specs[0] = (name, dtype, (shape[0] * row_scale, *shape[1:]))
    weights, buffer = build(old, rank, world, seed, specs)
    comm = eplb_xfer.create_communicator("nixl", None, weights, buffer, timeout_s=timeout_s)
    torch.distributed.barrier()  # every rank finished set-up

    def on_layer(done: int) -> None:
        if rank == trigger_rank and done == 0 and not at_start:
            emulated_hosts.signal_and_wait(marker, timeout_s=30.0)

    if rank == trigger_rank and at_start:
        emulated_hosts.signal_controller(marker)
    t0 = time.monotonic()
    try:
        eplb_xfer.rearrange_expert_weights_inplace(
            old, new, weights, buffer, None, comm, on_layer=on_layer
        )
        kind, peer, layer, committed, msg = "no error", None, None, list(range(num_layers)), ""
        blame = ""
    except eplb_xfer.TransferError as e:
        kind, peer, layer, committed, msg = (
            "TransferError",
            e.peer,
            e.layer,
            list(e.committed_layers),
            str(e),
        )
        blame = e.blame
    except Exception as e:  # reported, not raised: the test says what was expected
        kind, peer, layer, committed, msg = type(e).__name__, None, None, [], str(e)
        blame = ""
    elapsed = time.monotonic() - t0
    report: dict[str, Any] = {
        "kind": kind,
        "peer": peer,
        "layer": layer,
        "committed": committed,
        "msg": msg,
        "blame": blame,
        "elapsed": elapsed,
        "errors": check(weights, old, new, rank, world, seed, layers=committed, specs=specs),
    }
    emulated_hosts.report_partial(report)
    t1 = time.monotonic()
    comm.close()
    report["close_s"] = time.monotonic() - t1
    emulated_hosts.report_partial(report)
    return report


def misbehave(rank: int, world: int) -> dict[str, Any]:
    """Harness self-test, one rank per host: all ranks gather host names and
    addresses (the bridge carries gloo), then rank 0 returns, rank 1 raises,
    rank 2 exits without a result, rank 3 hangs (until the run's deadline)."""
    import os
    import socket

    import emulated_hosts

    mine = (socket.gethostname(), emulated_hosts.current_host())
    seen: list[Any] = [None] * world
    torch.distributed.all_gather_object(seen, mine)
    emulated_hosts.report_partial(seen)
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    if rank == 2:
        os._exit(3)
    if rank == 3:
        time.sleep(3600)
    return {"seen": seen}
