"""Tensor glue: argument checks, torch copies on streams, device checksums.

Row geometry (contiguity, strides, aliasing) is checked by the Rust core
(``_core.check_layout``), which reads it from the tensors themselves; this
module checks the structure (lists of tensors, dtypes, shapes, devices) and
runs the torch kernels of a rebalance on GPUs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from . import _core


def to_indices(x: object, name: str, ndims: tuple[int, ...] = (2,)) -> np.ndarray:
    """Converts a torch tensor / numpy array / nested list to contiguous int64.

    ``ndims`` lists the accepted ranks: ``(2,)`` for ``[L, P]`` placements,
    ``(1, 2)`` where one layer's ``[P]`` row is accepted too. Values must fit
    int64 (unsigned ids above it would wrap to negative ones).
    """
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer tensor, got dtype {x.dtype}")
        if x.device.type == "meta":
            raise ValueError(f"{name}: a meta tensor holds no values")
        arr = x.detach().to("cpu").numpy()
    elif isinstance(x, np.ndarray):
        arr = x
    elif isinstance(x, (list, tuple)):
        try:
            arr = np.asarray(x)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"{name}: not a rectangular array ({e})") from None
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer values, got dtype {arr.dtype}")
    if arr.ndim not in ndims:
        want = " or ".join("[num_layers, num_slots]" if n == 2 else "[num_slots]" for n in ndims)
        raise ValueError(f"{name}: expected shape {want}, got {tuple(arr.shape)}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: value {int(arr.max())} does not fit int64")
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_int(value: Any, name: str, low: int = 0, high: int | None = None) -> int:
    """An int (Python or numpy integer, not bool) in ``[low, high)``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    v = int(value)
    if v < low or (high is not None and v >= high):
        bound = f"{low}..{high - 1}" if high is not None else f">= {low}"
        raise ValueError(f"{name}: {v} is outside {bound}")
    return v


def is_seq(x: object) -> bool:
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
    """Checks the weights/buffer structure; returns ``(n_local, device)``.

    Every layer has the same tensors (count, dtype, shape) as
    ``expert_buffer``, all on one device with ``n_local`` rows. The memory
    (contiguous rows, no two rows sharing bytes) is the Rust core's check:
    :func:`check_memory`, or a NIXL communicator's registration.
    """
    if not is_seq(expert_buffer):
        raise TypeError(
            f"expert_buffer: expected a list of tensors, got {type(expert_buffer).__name__}"
        )
    if len(expert_buffer) == 0:
        raise ValueError("expert_buffer: expected a non-empty list of tensors")
    if not is_seq(expert_weights):
        raise TypeError(
            f"expert_weights: expected a list of layers, got {type(expert_weights).__name__}"
        )
    for t_idx, b in enumerate(expert_buffer):
        if not isinstance(b, torch.Tensor):
            raise TypeError(
                f"expert_buffer[{t_idx}]: expected a torch.Tensor, got {type(b).__name__}"
            )
        if b.dim() < 1:
            raise ValueError(f"expert_buffer[{t_idx}]: expected a row dimension, got a 0-d tensor")
    ref = expert_buffer[0]
    device = ref.device
    rows = ref.shape[0]
    if n_local is not None and rows != n_local:
        raise ValueError(f"expert_buffer[0]: has {rows} rows, expected n_local={n_local}")
    for t_idx, b in enumerate(expert_buffer):
        if b.device != device:
            raise ValueError(f"expert_buffer[{t_idx}]: on {b.device}, expected {device}")
        if b.shape[0] != rows:
            raise ValueError(f"expert_buffer[{t_idx}]: has {b.shape[0]} rows, expected {rows}")
    for l_idx, layer in enumerate(expert_weights):
        if not is_seq(layer):
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
            if not isinstance(w, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
            if w.device != device:
                raise ValueError(f"{name}: on {w.device}, expected {device}")
            if w.dtype != b.dtype or tuple(w.shape) != tuple(b.shape):
                raise ValueError(
                    f"{name}: {w.dtype} {tuple(w.shape)} does not match expert_buffer[{t_idx}] "
                    f"{b.dtype} {tuple(b.shape)}"
                )
    return rows, device


def check_memory(
    expert_weights: Sequence[Sequence[torch.Tensor]], expert_buffer: Sequence[torch.Tensor]
) -> None:
    """``ValueError`` naming the tensor unless every row is contiguous and no
    two rows (of any layer, tensor, or the buffer) share memory."""
    _core.check_layout([list(layer) for layer in expert_weights], list(expert_buffer))


def expert_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of one expert row summed over a layer's tensors."""
    return sum(t[0].numel() * t.element_size() for t in tensors)


def _foreach_copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Many copies in one torch call (one fused launch on CUDA); no temporaries."""
    if dst:
        torch._foreach_copy_(dst, src)


def copy_rows(
    dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]]
) -> None:
    """``dst[t][d] = src[t][s]`` for every ``(s, d)`` pair and tensor ``t``.

    Pairs must not chain (no destination is also a source of another pair).
    Host tensors are copied by the Rust core in one call; device tensors with
    one ``_foreach_copy_`` on the current stream.
    """
    if not pairs:
        return
    if all(t.device.type == "cpu" for t in (*dst, *src)):
        _core.copy_rows(list(dst), list(src), [(int(s), int(d)) for s, d in pairs])
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


def stream_context(stream: Any) -> contextlib.AbstractContextManager[Any]:
    """``torch.cuda.stream(stream)`` for a CUDA stream, else a no-op."""
    if stream is not None and torch.cuda.is_available():
        return torch.cuda.stream(stream)
    return contextlib.nullcontext()


def wait_for_stream(device: torch.device, stream: Any) -> None:
    """Blocks this thread until work queued so far on ``stream`` (default:
    the current stream) has run: an event recorded there is synchronized.
    Other streams (inference) keep running; nothing device-wide waits."""
    if device.type != "cuda":
        return
    ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
    ev.record(stream if stream is not None else torch.cuda.current_stream(device))
    ev.synchronize()


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Holds Ctrl-C back while a layer is being committed (so no rank commits
    half a layer), delivering it right after. Only the main thread gets
    signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[object] = []

    def hold(signum: int, frame: object) -> None:
        got.append(frame)

    old = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if got:
        if callable(old):
            old(signal.SIGINT, None)
        elif old is not signal.SIG_IGN:
            raise KeyboardInterrupt


_MASK64 = (1 << 64) - 1


def expert_checksums(experts: Sequence[Sequence[torch.Tensor]]) -> list[int]:
    """The ``verify`` checksum of each expert, given as its rows (one
    contiguous tensor per weight tensor). The definition lives in the Rust
    core: host rows are hashed there; device rows contribute three exact
    int64 sums per row computed by torch on their device (one host sync in
    all), which the core folds the same way."""
    if not experts:
        return []
    if all(row.device.type == "cpu" for rows in experts for row in rows):
        return _core.expert_checksums([list(rows) for rows in experts])
    parts: list[torch.Tensor] = []
    weights: dict[tuple[int, torch.device], torch.Tensor] = {}
    for rows in experts:
        for row in rows:
            b = row.reshape(-1).view(torch.uint8)
            n = b.numel()
            c = _core.checksum_block_width(n)
            blocks = b.view(n // c, c)
            for key in ((n // c, row.device), (c, row.device)):
                if key not in weights:
                    weights[key] = torch.arange(1, key[0] + 1, dtype=torch.int64, device=row.device)
            by_block = blocks.sum(dim=1, dtype=torch.int64)
            by_col = blocks.sum(dim=0, dtype=torch.int64)
            parts.append(
                torch.stack(
                    [
                        by_block.sum(),
                        (by_block * weights[(n // c, row.device)]).sum(),
                        (by_col * weights[(c, row.device)]).sum(),
                    ]
                )
            )
    values = torch.stack(parts).tolist()  # one host sync
    grouped: list[list[tuple[int, int, int]]] = []
    i = 0
    for rows in experts:
        g = []
        for _ in rows:
            a, b2, c2 = values[i]
            g.append((a & _MASK64, b2 & _MASK64, c2 & _MASK64))
            i += 1
        grouped.append(g)
    return _core.checksums_from_parts(grouped)


_CHECKSUM_ENTRY = np.dtype([("row", "<u4"), ("checksum", "<u8")])


def checksum_payload(rows: Sequence[int], sums: Sequence[int]) -> bytes:
    """A READY payload: ``(row, checksum)`` entries (the Rust core's format)."""
    table = np.zeros(len(rows), dtype=_CHECKSUM_ENTRY)
    table["row"] = list(rows)
    table["checksum"] = list(sums)
    return table.tobytes()


def read_checksum_payload(payload: bytes | None) -> dict[int, int]:
    """Inverse of :func:`checksum_payload`."""
    entries = np.frombuffer(payload or b"", dtype=_CHECKSUM_ENTRY)
    return {int(r): int(c) for r, c in zip(entries["row"], entries["checksum"])}
