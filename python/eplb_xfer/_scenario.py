"""The demo's scenarios: placements with redundant replicas and empty
slots, expert rows whose bytes identify (layer, tensor, expert), and a
byte-exact check of a rebalance (also used by the benchmarks)."""

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
