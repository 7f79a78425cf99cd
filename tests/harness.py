"""Test harness: scenarios, an independent byte oracle, vLLM's EPLB driver
logic re-stated for tests, and fault injection through the NIXL shim.

Nothing here is imported by the product; the oracle does not use the
product's demo helpers, so a bug there cannot hide a bug in a transfer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Spec:
    """One stacked weight tensor: dtype and row shape."""

    dtype: torch.dtype
    row_shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * torch.empty((), dtype=self.dtype).element_size()


#: fp8-as-uint8 weights, fp32 scales, bf16 biases: mixed dtypes and row sizes
MIXED = [
    Spec(torch.uint8, (8, 12)),
    Spec(torch.float32, (2, 3)),
    Spec(torch.bfloat16, (5,)),
    Spec(torch.uint8, (12, 4)),
]


def expert_bytes_of(layer: int, tensor: int, expert: int, n: int) -> np.ndarray:
    """The bytes expert ``expert`` holds in ``tensor`` of ``layer`` (an
    arithmetic pattern unique per (layer, tensor, expert))."""
    i = np.arange(n, dtype=np.uint64)
    key = np.uint64((layer * 1_000_003 + tensor * 10_007 + expert * 97 + 13) & 0xFFFFFFFF)
    v = (i * np.uint64(2654435761) + key * np.uint64(40503)) ^ (key << np.uint64(7))
    return ((v >> np.uint64(11)) & np.uint64(0xFF)).astype(np.uint8)


EMPTY_BYTE = 0xE5


def placement(
    rng: np.random.Generator, layers: int, experts: int, slots: int, empty: int = 0
) -> np.ndarray:
    """``[L, P]``: every expert once, random replicas, ``empty`` -1 slots."""
    out = np.empty((layers, slots), dtype=np.int64)
    for layer in range(layers):
        extra = slots - experts - empty
        hot = rng.integers(0, experts, size=extra) if extra > 0 else np.empty(0, np.int64)
        row = np.concatenate([np.arange(experts), hot, np.full(empty, -1)])
        out[layer] = rng.permutation(row)
    return out


def scenario(
    seed: int, world: int, layers: int, n_local: int, empty: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    rng = np.random.default_rng(seed)
    slots = world * n_local
    experts = max(1, slots - world - empty)
    return (
        placement(rng, layers, experts, slots, empty),
        placement(rng, layers, experts, slots, empty),
        experts,
    )


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).view(torch.uint8)


def build(
    specs: Sequence[Spec], old: np.ndarray, rank: int, world: int, device: str = "cpu"
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """This rank's weights per ``old`` and an empty buffer."""
    layers, slots = old.shape
    n = slots // world
    weights = []
    for layer in range(layers):
        ts = []
        for t, s in enumerate(specs):
            w = torch.empty((n, *s.row_shape), dtype=s.dtype)
            wb = _rows(w)
            for r in range(n):
                e = int(old[layer, rank * n + r])
                if e >= 0:
                    wb[r] = torch.from_numpy(expert_bytes_of(layer, t, e, s.row_bytes))
                else:
                    wb[r].fill_(EMPTY_BYTE)
            ts.append(w.to(device))
        weights.append(ts)
    buffer = [torch.empty((n, *s.row_shape), dtype=s.dtype, device=device) for s in specs]
    return weights, buffer


def check(
    specs: Sequence[Spec],
    weights: Sequence[Sequence[torch.Tensor]],
    old: np.ndarray,
    new: np.ndarray,
    rank: int,
    world: int,
    layers: Sequence[int] | None = None,
) -> list[str]:
    """Mismatches of this rank's rows: layers in ``layers`` (default all)
    must hold ``new`` (a -1 slot keeps its old bytes), every other layer
    ``old``."""
    n_layers, slots = old.shape
    n = slots // world
    done = set(range(n_layers)) if layers is None else set(layers)
    errors = []
    for layer in range(n_layers):
        target = new if layer in done else old
        for t, (w, s) in enumerate(zip(weights[layer], specs)):
            wb = _rows(w.cpu())
            for r in range(n):
                e = int(target[layer, rank * n + r])
                if e < 0:
                    e = int(old[layer, rank * n + r])
                want = (
                    expert_bytes_of(layer, t, e, s.row_bytes)
                    if e >= 0
                    else np.full(s.row_bytes, EMPTY_BYTE, np.uint8)
                )
                if not np.array_equal(wb[r].numpy(), want):
                    errors.append(f"rank {rank} layer {layer} tensor {t} row {r}: not expert {e}")
    return errors


def snapshot(weights: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
    return [[_rows(t).clone() for t in layer] for layer in weights]


def unchanged(
    weights: Sequence[Sequence[torch.Tensor]], snap: list[list[torch.Tensor]]
) -> list[int]:
    """Layers whose bytes equal the snapshot bit for bit."""
    return [
        i
        for i, (layer, saved) in enumerate(zip(weights, snap))
        if all(torch.equal(_rows(t), s) for t, s in zip(layer, saved))
    ]


# -- vLLM's EPLB driver, re-stated from its documented behaviour -------------------


def vllm_layer_moves(
    old_row: np.ndarray, new_row: np.ndarray, rank: int, world: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int, int]], list[int]]:
    """One layer of vLLM's ``move_to_buffer`` for ``rank``.

    Returns ``(local_copies (src_row, dst_row), sends (dst_rank, expert),
    recvs (src_rank, expert, dst_row), dup_rows)``. Senders of an expert are
    the ranks holding it in ``old``; receivers hold it in ``new`` but not in
    ``old``; receivers are split evenly over senders in rank order (the
    first ``len(recv) // len(send)`` to the first sender, ...); each expert
    is received once, into its first new row; duplicate rows are filled
    after commit from that primary row.
    """
    slots = old_row.shape[0]
    n = slots // world
    base = rank * n
    old_local = old_row[base : base + n]
    new_local = new_row[base : base + n]

    def holders(row: np.ndarray, e: int) -> list[int]:
        out: list[int] = []
        for s in np.flatnonzero(row == e):
            r = int(s) // n
            if r not in out:
                out.append(r)
        return out

    local: list[tuple[int, int]] = []
    recvs: list[tuple[int, int, int]] = []
    dups: list[int] = []
    seen: dict[int, int] = {}
    for d in range(n):
        e = int(new_local[d])
        if e < 0 or e == int(old_local[d]):
            continue
        hit = np.flatnonzero(old_local == e)
        if hit.size:
            local.append((int(hit[0]), d))
            continue
        if e in seen:
            dups.append(d)
            continue
        seen[e] = d
        send = holders(old_row, e)
        recv = [r for r in holders(new_row, e) if r not in send]
        p = recv.index(rank)
        k = len(recv) // len(send)
        src = send[p // k] if k and p < len(send) * k else send[p - len(send) * k]
        recvs.append((src, e, d))
    sends: list[tuple[int, int]] = []
    for e in sorted({int(x) for x in old_local if x >= 0}):
        send = holders(old_row, e)
        recv = [r for r in holders(new_row, e) if r not in send]
        i = send.index(rank)
        k = len(recv) // len(send)
        mine = recv[i * k : (i + 1) * k]
        if len(send) * k + i < len(recv):
            mine.append(recv[len(send) * k + i])
        sends.extend((dst, e) for dst in mine)
    return local, sends, recvs, dups


def vllm_commit(
    weights: Sequence[torch.Tensor],
    buffer: Sequence[torch.Tensor],
    moves: tuple[
        list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int, int]], list[int]
    ],
    new_row: np.ndarray,
    rank: int,
    world: int,
    received: dict[int, Sequence[torch.Tensor]] | None = None,
) -> None:
    """vLLM's ``move_from_buffer``: locally copied and received rows from the
    buffer (or, for receives, from the caller's own receive tensors by row),
    then duplicates from their primary row."""
    local, _sends, recvs, dups = moves
    n = new_row.shape[0] // world
    new_local = new_row[rank * n : (rank + 1) * n]
    for _s, d in local:
        for w, b in zip(weights, buffer):
            w[d].copy_(b[d])
    primary: dict[int, int] = {}
    for _src, e, d in recvs:
        primary[e] = d
        src = received[d] if received is not None else [b[d] for b in buffer]
        for w, b in zip(weights, src):
            w[d].copy_(b.reshape(w[d].shape))
    for d in dups:
        p = primary[int(new_local[d])]
        for w in weights:
            w[d].copy_(w[p])


def vllm_move_layer(
    comm: object,
    weights: Sequence[torch.Tensor],
    buffer: Sequence[torch.Tensor],
    old_row: np.ndarray,
    new_row: np.ndarray,
    layer: int,
    rank: int,
    world: int,
    *,
    received: dict[int, list[torch.Tensor]] | None = None,
    context: bool = True,
    stream: object = None,
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int, int]], list[int]]:
    """One layer of vLLM's ``move_to_buffer`` through a communicator: local
    copies into the buffer (on ``stream``), ``set_transfer_context`` (unless
    ``context`` is False: the older ``execute(old_indices=...)`` style),
    ``add_send`` / ``add_recv`` (into ``received[dst_row]`` when given),
    ``execute``. Returns the moves for :func:`vllm_commit`."""
    moves = vllm_layer_moves(old_row, new_row, rank, world)
    local, sends, recvs, _dups = moves
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        for s, d in local:
            for b, t in zip(buffer, weights):
                b[d].copy_(t[s])
    if context:
        comm.set_transfer_context(old_row, layer)  # type: ignore[attr-defined]
    n = old_row.shape[0] // world
    mine = old_row[rank * n : (rank + 1) * n]
    for dst, e in sends:
        row = int(np.flatnonzero(mine == e)[0])
        comm.add_send([t[row] for t in weights], dst, expert_id=e)  # type: ignore[attr-defined]
    for src, e, d in recvs:
        targets = received[d] if received is not None else [b[d] for b in buffer]
        comm.add_recv(targets, src, expert_id=e)  # type: ignore[attr-defined]
    if context:
        comm.execute()  # type: ignore[attr-defined]
    else:
        comm.execute(old_indices=old_row)  # type: ignore[attr-defined]
    return moves


# -- fault injection ------------------------------------------------------------


def build_shim(out_dir: str | None = None) -> str:
    """Compiles ``tests/nixl_shim.c`` (a forwarding stand-in for NIXL's C API
    with fault points); returns the library path."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc) to build the NIXL test shim")
    out = Path(out_dir or tempfile.mkdtemp(prefix="eplbx-shim-")) / "nixl_shim.so"
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(HERE / "nixl_shim.c"), "-ldl"],
        check=True,
    )
    return str(out)


def use_shim(fault: str | None = None) -> None:
    """Makes NIXL communicators created after this call in this process load
    the shim (path in ``EPLBX_SHIM_PATH``), with ``fault`` ("<kind>:<seq>")."""
    from eplb_xfer.nixl import find_nixl_capi

    shim = os.environ.get("EPLBX_SHIM_PATH")
    if not shim:
        raise RuntimeError("EPLBX_SHIM_PATH is not set (the conftest builds the shim)")
    os.environ.pop("EPLB_XFER_NIXL_LIB", None)
    os.environ["EPLBX_SHIM_REAL"] = str(find_nixl_capi())
    os.environ["EPLB_XFER_NIXL_LIB"] = shim
    if fault:
        os.environ["EPLBX_SHIM_FAULT"] = fault
    else:
        os.environ.pop("EPLBX_SHIM_FAULT", None)


def rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
