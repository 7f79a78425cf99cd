"""Tensor glue: validation, row layouts and the torch copies of a rebalance.

Everything here is Python-side because it touches torch tensors; the plan it
executes comes from Rust.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import _core


@dataclass(frozen=True)
class RowLayout:
    """Row geometry of one stacked tensor: row r at ``base + r * row_stride``."""

    base: int
    row_stride: int
    row_bytes: int

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.base, self.row_stride, self.row_bytes)


def _rows(t: torch.Tensor) -> tuple[int, int, int]:
    """``(base, row_stride, row_bytes)`` of ``t``, rows along dim 0 (cheap: no
    views created; :func:`row_layout` adds the checks)."""
    es = t.element_size()
    n = t.shape[0]
    return (t.data_ptr(), t.stride(0) * es, (t.numel() // n if n else 0) * es)


def row_layout(t: torch.Tensor, name: str) -> RowLayout:
    """Row layout of ``t`` (rows along dim 0); each row must be contiguous."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 1:
        raise ValueError(
            f"{name}: expected a tensor with a row dimension, got shape {tuple(t.shape)}"
        )
    if t.shape[0] > 0 and not t[0].is_contiguous():
        raise ValueError(f"{name}: each row (expert) must be contiguous; strides {t.stride()}")
    base, stride, row_bytes = _rows(t)
    if row_bytes == 0:
        raise ValueError(f"{name}: rows of 0 bytes (shape {tuple(t.shape)})")
    if t.shape[0] <= 1:
        stride = row_bytes  # a lone row's stride is meaningless (may be 0)
    elif stride < row_bytes:
        raise ValueError(f"{name}: rows overlap (row stride {stride} B < row size {row_bytes} B)")
    return RowLayout(base, stride, row_bytes)


def span(t: torch.Tensor) -> tuple[int, int]:
    """``(addr, nbytes)`` covering every row of ``t``."""
    lay = row_layout(t, "tensor")
    n = t.shape[0]
    return (lay.base, lay.row_stride * (n - 1) + lay.row_bytes if n else 0)


def to_indices(x: object, name: str, ndims: tuple[int, ...] = (2,)) -> np.ndarray:
    """Converts a torch tensor / numpy array / nested list to contiguous int64.

    ``ndims`` lists the accepted ranks: ``(2,)`` for ``[L, P]`` placements,
    ``(1, 2)`` where one layer's ``[P]`` row is accepted too.
    """
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer tensor, got dtype {x.dtype}")
        arr = x.detach().to("cpu").numpy()
    elif isinstance(x, np.ndarray):
        arr = x
    elif isinstance(x, (list, tuple)):
        arr = np.asarray(x)
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer values, got dtype {arr.dtype}")
    if arr.ndim not in ndims:
        want = " or ".join("[num_layers, num_slots]" if n == 2 else "[num_slots]" for n in ndims)
        raise ValueError(f"{name}: expected shape {want}, got {tuple(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _is_seq(x: object) -> bool:
    """A list-like of tensors (list, tuple, ParameterList...), not a tensor."""
    return (
        hasattr(x, "__len__")
        and hasattr(x, "__getitem__")
        and not isinstance(x, (torch.Tensor, str, bytes, np.ndarray))
    )


def validate_weights(
    expert_weights: Sequence[Sequence[torch.Tensor]],
    expert_buffer: Sequence[torch.Tensor],
    n_local: int | None = None,
) -> tuple[int, torch.device]:
    """Checks the weights/buffer contract; returns ``(n_local, device)``.

    Every layer has the same tensors (count, dtype, row shape) as
    ``expert_buffer``; all tensors share one device and ``n_local`` rows.
    """
    if not _is_seq(expert_buffer):
        raise TypeError(
            f"expert_buffer: expected a list of tensors, got {type(expert_buffer).__name__}"
        )
    if len(expert_buffer) == 0:
        raise ValueError("expert_buffer: expected a non-empty list of tensors")
    if not _is_seq(expert_weights):
        raise TypeError(
            f"expert_weights: expected a list of layers, got {type(expert_weights).__name__}"
        )
    ref = expert_buffer[0]
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"expert_buffer[0]: expected a torch.Tensor, got {type(ref).__name__}")
    device = ref.device
    rows = ref.shape[0] if ref.dim() > 0 else -1
    if n_local is not None and rows != n_local:
        raise ValueError(f"expert_buffer[0]: has {rows} rows, expected n_local={n_local}")
    n_local = rows
    for t_idx, b in enumerate(expert_buffer):
        row_layout(b, f"expert_buffer[{t_idx}]")
        if b.device != device:
            raise ValueError(f"expert_buffer[{t_idx}]: on {b.device}, expected {device}")
        if b.shape[0] != n_local:
            raise ValueError(f"expert_buffer[{t_idx}]: has {b.shape[0]} rows, expected {n_local}")
    for l_idx, layer in enumerate(expert_weights):
        if not _is_seq(layer):
            raise TypeError(
                f"expert_weights[{l_idx}]: expected a list of tensors, got {type(layer).__name__}"
            )
        if len(layer) != len(expert_buffer):
            raise ValueError(
                f"expert_weights[{l_idx}]: has {len(layer)} tensors, expected {len(expert_buffer)} "
                "(like expert_buffer)"
            )
        for t_idx, (w, b) in enumerate(zip(layer, expert_buffer)):
            name = f"expert_weights[{l_idx}][{t_idx}]"
            row_layout(w, name)
            if w.device != device:
                raise ValueError(f"{name}: on {w.device}, expected {device}")
            if w.dtype != b.dtype or tuple(w.shape) != tuple(b.shape):
                raise ValueError(
                    f"{name}: {w.dtype} {tuple(w.shape)} does not match expert_buffer[{t_idx}] "
                    f"{b.dtype} {tuple(b.shape)}"
                )
    return n_local, device


def expert_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of one expert row summed over a layer's tensors."""
    return sum(t[0].numel() * t.element_size() for t in tensors)


def _foreach_copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Many row copies in one torch call (one fused launch on CUDA, a C++ loop
    on CPU); no temporary memory."""
    if not dst:
        return
    if _FOREACH_COPY is not None:
        _FOREACH_COPY(dst, src)
    else:  # pragma: no cover - torch without _foreach_copy_
        for d, s in zip(dst, src):
            d.copy_(s)


_FOREACH_COPY = getattr(torch, "_foreach_copy_", None)


def copy_rows(
    dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]]
) -> None:
    """``dst[t][d] = src[t][s]`` for every ``(s, d)`` pair and tensor ``t``.

    Pairs must not chain (no destination is also a source of another pair).
    Host tensors are copied by the Rust core in one call (row dispatch from
    Python dominated per-layer latency); device tensors with one torch
    ``_foreach_copy_`` (one fused launch per dtype group, no temporaries).
    """
    if not pairs:
        return
    if all(t.device.type == "cpu" for t in (*dst, *src)):
        _core.host_copy_rows(
            [_rows(t) for t in dst],
            [_rows(t) for t in src],
            min(t.shape[0] for t in (*dst, *src)),
            list(pairs),
        )
        return
    d_list: list[torch.Tensor] = []
    s_list: list[torch.Tensor] = []
    for d_t, s_t in zip(dst, src):
        d_list.extend(d_t[d] for _s, d in pairs)
        s_list.extend(s_t[s] for s, _d in pairs)
    _foreach_copy(d_list, s_list)


def copy_runs(
    dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], runs: Sequence[tuple[int, int]]
) -> None:
    """``dst[t][a:a+n] = src[t][a:a+n]`` for each ``(a, n)`` run and tensor ``t``."""
    if not runs:
        return
    if all(t.device.type == "cpu" for t in (*dst, *src)):
        copy_rows(dst, src, [(r, r) for a, n in runs for r in range(a, a + n)])
        return
    d_list: list[torch.Tensor] = []
    s_list: list[torch.Tensor] = []
    for d_t, s_t in zip(dst, src):
        d_list.extend(d_t[a : a + n] for a, n in runs)
        s_list.extend(s_t[a : a + n] for a, n in runs)
    _foreach_copy(d_list, s_list)


def synchronize(device: torch.device) -> None:
    """Waits for every CUDA stream on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_MASK64 = (1 << 64) - 1


def _mix64(h: int, v: int) -> int:
    """Folds ``v`` into ``h`` (splitmix64 finalizer over the xor)."""
    z = (h ^ (v & _MASK64)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _block_width(nbytes: int) -> int:
    """Bytes per block of the checksum's 2-D view: the largest power of two up
    to 4096 dividing ``nbytes`` (depends on the row size only, so source and
    reader agree)."""
    c = 4096
    while nbytes % c:
        c //= 2
    return c


def expert_checksums(experts: Sequence[Sequence[torch.Tensor]]) -> list[int]:
    """A cheap 64-bit checksum of each expert, given as its rows (one tensor
    per weight tensor, each contiguous).

    Each row's bytes are viewed as ``[m, C]`` blocks; the sum of all bytes,
    the block sums weighted by block index and the column sums weighted by
    column index (exact int64 arithmetic, so the same on CPU and GPU whatever
    the reduction order) are mixed into one value. It catches flipped,
    shifted and swapped bytes; it is not cryptographic. Host rows are hashed
    by the Rust core in one call; device rows with torch on their device, one
    host sync in all. No copy of the rows is made.
    """
    if not experts:
        return []
    if all(row.device.type == "cpu" and row.is_contiguous() for rows in experts for row in rows):
        return _core.host_expert_checksums(
            [
                [(row.data_ptr(), row.numel() * row.element_size()) for row in rows]
                for rows in experts
            ]
        )
    return _torch_expert_checksums(experts)


def _torch_expert_checksums(experts: Sequence[Sequence[torch.Tensor]]) -> list[int]:
    """:func:`expert_checksums` with torch kernels (any device)."""
    parts: list[torch.Tensor] = []
    weights: dict[tuple[int, torch.device], torch.Tensor] = {}
    for rows in experts:
        for row in rows:
            b = row.reshape(-1).view(torch.uint8)
            n = b.numel()
            c = _block_width(n)
            blocks = b.view(n // c, c)
            key_m, key_c = (n // c, row.device), (c, row.device)
            for key in (key_m, key_c):
                if key not in weights:
                    weights[key] = torch.arange(1, key[0] + 1, dtype=torch.int64, device=row.device)
            by_block = blocks.sum(dim=1, dtype=torch.int64)
            by_col = blocks.sum(dim=0, dtype=torch.int64)
            parts.append(
                torch.stack(
                    [
                        by_block.sum(),
                        (by_block * weights[key_m]).sum(),
                        (by_col * weights[key_c]).sum(),
                    ]
                )
            )
    values = torch.stack(parts).tolist()  # one host sync
    out = []
    i = 0
    for rows in experts:
        h = 0x45504C42  # "EPLB"
        for _ in rows:
            for v in values[i]:
                h = _mix64(h, int(v))
            i += 1
        out.append(h)
    return out


def row_checksums(tensors: Sequence[torch.Tensor], rows: Sequence[int]) -> list[int]:
    """:func:`expert_checksums` of rows ``rows`` of the stacked ``tensors``."""
    return expert_checksums([[t[r] for t in tensors] for r in rows])
