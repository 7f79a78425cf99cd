"""Scenario helpers shared by the demo, benchmarks and tests.

Placements with redundant replicas and empty slots, expert rows whose bytes
identify (layer, tensor, expert), and a byte-exact check of a rebalance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TensorSpec:
    """One stacked weight tensor per expert row: dtype and row shape."""

    name: str
    dtype: torch.dtype
    row_shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        n = 1
        for d in self.row_shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def random_placement(
    rng: np.random.Generator,
    num_layers: int,
    num_experts: int,
    num_slots: int,
    empty_slots: int = 0,
) -> np.ndarray:
    """``[L, P]`` placement: every expert at least once, some hot experts
    replicated, ``empty_slots`` slots set to -1, shuffled per layer."""
    if num_experts + empty_slots > num_slots:
        raise ValueError(
            f"num_slots: {num_slots} cannot hold {num_experts} experts "
            f"and {empty_slots} empty slots"
        )
    out = np.empty((num_layers, num_slots), dtype=np.int64)
    for layer in range(num_layers):
        extra = num_slots - num_experts - empty_slots
        hot = rng.choice(num_experts, size=extra, replace=True) if extra else np.empty(0, np.int64)
        row = np.concatenate([np.arange(num_experts), hot, np.full(empty_slots, -1)])
        out[layer] = rng.permutation(row)
    return out


def expert_library(
    specs: Sequence[TensorSpec], num_experts: int, layer: int, seed: int
) -> list[torch.Tensor]:
    """Per tensor, ``[num_experts, row_bytes]`` uint8 contents for ``layer``."""
    libs = []
    for t, s in enumerate(specs):
        g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 1009 + t)
        libs.append(
            torch.randint(0, 256, (num_experts, s.row_bytes), generator=g, dtype=torch.uint8)
        )
    return libs


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).view(torch.uint8)


def build_weights(
    specs: Sequence[TensorSpec],
    placement: np.ndarray,
    rank: int,
    ep_size: int,
    num_experts: int,
    seed: int,
    device: str | torch.device = "cpu",
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """This rank's weights (rows filled per ``placement``) and an empty buffer.

    Empty (-1) slots get a recognisable filler of 0xEE bytes.
    """
    num_layers, num_slots = placement.shape
    n_local = num_slots // ep_size
    weights: list[list[torch.Tensor]] = []
    for layer in range(num_layers):
        libs = expert_library(specs, num_experts, layer, seed)
        row_ids = placement[layer, rank * n_local : (rank + 1) * n_local]
        tensors = []
        for s, lib in zip(specs, libs):
            w = torch.empty((n_local, *s.row_shape), dtype=s.dtype, device=device)
            wb = _bytes(w)
            for r, e in enumerate(row_ids):
                if e >= 0:
                    wb[r].copy_(lib[e])
                else:
                    wb[r].fill_(0xEE)
            tensors.append(w)
        weights.append(tensors)
    buffer = [torch.empty((n_local, *s.row_shape), dtype=s.dtype, device=device) for s in specs]
    return weights, buffer


def verify(
    specs: Sequence[TensorSpec],
    weights: Sequence[Sequence[torch.Tensor]],
    old: np.ndarray,
    new: np.ndarray,
    rank: int,
    ep_size: int,
    num_experts: int,
    seed: int,
    layers: Sequence[int] | None = None,
) -> list[str]:
    """Byte-exact check of this rank's rows; returns a list of mismatches.

    A slot must hold ``new``'s expert; a -1 slot must keep its old bytes.
    Only ``layers`` are expected to be rebalanced (default: all); every other
    layer must still hold ``old``.
    """
    num_layers, num_slots = old.shape
    n_local = num_slots // ep_size
    done = set(range(num_layers) if layers is None else layers)
    errors = []
    for layer in range(num_layers):
        libs = expert_library(specs, num_experts, layer, seed)
        target = new if layer in done else old
        for t, (w, lib) in enumerate(zip(weights[layer], libs)):
            wb = _bytes(w.cpu())
            for r in range(n_local):
                slot = rank * n_local + r
                e = int(target[layer, slot])
                if e < 0:
                    e = int(old[layer, slot])
                want = lib[e] if e >= 0 else torch.full_like(lib[0], 0xEE)
                if not torch.equal(wb[r], want):
                    errors.append(
                        f"rank {rank} layer {layer} tensor {t} ({specs[t].name}) row {r}: "
                        f"expected expert {e}"
                    )
    return errors


def snapshot(weights: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """A copy of every tensor's bytes (for :func:`unchanged_layers`)."""
    return [[_bytes(t).clone() for t in layer] for layer in weights]


def unchanged_layers(
    weights: Sequence[Sequence[torch.Tensor]], snap: Sequence[Sequence[torch.Tensor]]
) -> list[int]:
    """Layers whose bytes equal the :func:`snapshot` bit for bit (NaN-safe)."""
    return [
        li
        for li, (layer, saved) in enumerate(zip(weights, snap))
        if all(torch.equal(_bytes(t), s) for t, s in zip(layer, saved))
    ]


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``; 0 elsewhere)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def soak_rank(
    rank: int,
    world: int,
    mode: str,
    rounds: int,
    *,
    check_every: int = 1,
    warmup: int = 20,
    verify_checksums: bool = False,
    seed: int = 2024,
) -> dict[str, object]:
    """``rounds`` consecutive rebalances through one NixlCommunicator (run on
    every rank of a group), each to a fresh random placement.

    Every ``check_every``-th result is checked byte for byte. Returns the
    mismatches, RSS after ``warmup`` rounds and at the end, and after every
    round the NIXL counters that must not grow: live requests, live prepared
    lists, buffered messages.
    """
    import time

    import eplb_xfer

    specs = [
        TensorSpec("w13", torch.uint8, (16, 24)),
        TensorSpec("s13", torch.float32, (2, 3)),
        TensorSpec("w2", torch.uint8, (24, 8)),
        TensorSpec("s2", torch.float32, (3, 1)),
    ]
    rng = np.random.default_rng(seed)
    n_local, num_layers = 4, 3
    num_slots = world * n_local
    num_experts = num_slots - world
    first = random_placement(rng, num_layers, num_experts, num_slots, 0)
    weights, buffer = build_weights(specs, first, rank, world, num_experts, seed)
    comm = eplb_xfer.NixlCommunicator(
        None, weights, buffer, mode=mode, timeout_s=30.0, verify=verify_checksums
    )
    errors: list[str] = []
    requests_live: set[int] = set()
    lists_live: set[int] = set()
    inbox_max = 0
    rss_warm = 0
    cur = first
    t0 = time.perf_counter()
    t_warm = t0
    for i in range(rounds):
        nxt = random_placement(rng, num_layers, num_experts, num_slots, 0)
        eplb_xfer.rearrange_expert_weights_inplace(cur, nxt, weights, buffer, None, comm)
        if (i + 1) % check_every == 0 or i == rounds - 1:
            errors += verify(specs, weights, first, nxt, rank, world, num_experts, seed)[:3]
        c = comm.counters
        requests_live.add(int(c["requests_live"]))  # type: ignore[call-overload]
        lists_live.add(int(c["prepared_lists_live"]))  # type: ignore[call-overload]
        inbox_max = max(inbox_max, int(c["inbox_entries"]))  # type: ignore[call-overload]
        cur = nxt
        if i + 1 == warmup:
            rss_warm = rss_bytes()
            t_warm = time.perf_counter()
    seconds = time.perf_counter() - t0
    counters = comm.counters
    comm.close()
    return {
        "rounds": rounds,
        "errors": errors,
        "rss_after_warmup": rss_warm,
        "rss_end": rss_bytes(),
        "requests_live_seen": sorted(requests_live),
        "prepared_lists_live_seen": sorted(lists_live),
        "inbox_entries_max": inbox_max,
        "counters_end": counters,
        "seconds": seconds,
        "seconds_after_warmup": time.perf_counter() - t_warm,
    }
