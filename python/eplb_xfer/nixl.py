"""NixlCommunicator: thin Python over the Rust NIXL engine.

Python finds NIXL's C API library, describes tensors (pointers, row strides,
row sizes, device) and runs torch copies; Rust owns the agent, registrations,
prepared descriptor lists, the per-layer READ/notification protocol and its
deadline.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist

from . import _core
from ._tensors import (
    RowLayout,
    expert_bytes,
    expert_checksums,
    row_checksums,
    row_layout,
    span,
    synchronize,
    validate_weights,
)
from .communicator import EplbCommunicator, check_expert, check_rank, layer_row
from .errors import TransferError
from .planning import TransferPlan

log = logging.getLogger("eplb_xfer.nixl")

MODES = ("zero_copy", "staged")

#: UCX settings applied (unless the user set them) before the first agent exists.
#: Without GET zero-copy, NIXL READ between GPUs runs over TCP emulation
#: (0.5 GB/s instead of about 1 TB/s on an H100).
UCX_DEFAULTS = {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y"}


def find_nixl_capi() -> Path:
    """Locates ``libnixl_capi.so`` of the installed ``nixl-cuXX`` wheel.

    ``EPLB_XFER_NIXL_LIB`` overrides. The CUDA major of torch picks the
    variant; any installed variant is used when torch has no CUDA.
    """
    env = os.environ.get("EPLB_XFER_NIXL_LIB")
    if env:
        return Path(env)
    cuda = torch.version.cuda
    majors = [cuda.split(".")[0]] if cuda else []
    majors += [m for m in ("13", "12") if m not in majors]
    tried = []
    for major in majors:
        mod = f"nixl_cu{major}"
        spec = importlib.util.find_spec(mod)
        if spec is None or not spec.submodule_search_locations:
            tried.append(f"{mod} (not installed)")
            continue
        pkg_dir = Path(next(iter(spec.submodule_search_locations)))
        lib = pkg_dir.parent / f".{mod}.mesonpy.libs" / "libnixl_capi.so"
        if lib.exists():
            return lib
        tried.append(str(lib))
    raise _core.NixlUnavailable(
        "NIXL C API library not found; install the nixl-cu13 (or -cu12) wheel matching "
        f"torch's CUDA ({cuda}) or set EPLB_XFER_NIXL_LIB. Tried: {', '.join(tried)}"
    )


def apply_ucx_defaults() -> None:
    """Sets :data:`UCX_DEFAULTS` in the environment unless already set. UCX reads
    them when an agent's backend starts, so this runs before any agent exists."""
    for k, v in UCX_DEFAULTS.items():
        os.environ.setdefault(k, v)


class NixlCommunicator(EplbCommunicator):
    """Receiver-initiated NIXL READ of expert rows.

    * ``mode="zero_copy"`` (default): every layer's weights and the buffer are
      registered once; receivers READ straight from the source's weight rows.
      ``staging_bytes == 0``.
    * ``mode="staged"``: one packed send layer (``n_local`` expert slots); each
      local expert is packed once, however many peers read it, at the slot of
      its first row (``expert_to_slot``); receivers READ into buffer rows.

    Set-up exchanges NIXL metadata and layouts once over ``group`` (an object
    all-gather); a rebalance uses NIXL notifications only. The weights and
    buffer are bound at construction: reallocate them and you need a new one.

    Args:
        group: process group of the EP ranks.
        expert_weights: per layer, the stacked tensors ``[n_local, ...]``.
        expert_buffer: one layer's worth of tensors like ``expert_weights[0]``.
        mode: ``"zero_copy"`` or ``"staged"``.
        timeout_s: deadline of each layer's exchange; past it every surviving
            rank raises :class:`TransferError`.
        verify: check every received expert against a checksum its source
            computed (:func:`row_checksums`) before the layer may commit; a
            mismatch raises :class:`TransferError` naming the source on every
            rank, and no rank commits that layer. Costs one hash pass over the
            sent and received rows per layer.
        lib_path: explicit ``libnixl_capi.so`` (default: found from the wheel).

    Failure semantics: a peer that dies or stops answering makes every
    surviving rank raise :class:`TransferError` within about ``timeout_s`` (plus
    at most 2 s, to agree on the outcome); all survivors report the same layer
    and the same committed layers (see :meth:`end_rebalance`).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        expert_weights: Sequence[Sequence[torch.Tensor]],
        expert_buffer: Sequence[torch.Tensor],
        *,
        mode: str = "zero_copy",
        timeout_s: float = 60.0,
        verify: bool = False,
        lib_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(group)
        if not isinstance(verify, bool):
            raise TypeError(f"verify: expected a bool, got {verify!r}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, (int, float))
            or not (timeout_s > 0 and np.isfinite(timeout_s))
        ):
            raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
        n_local, device = validate_weights(expert_weights, expert_buffer)
        self.mode = mode
        self.timeout_s = float(timeout_s)
        self.verify = verify
        self._failure: TransferError | None = None
        self._corrupt_layer = _fault_layer("corrupt_send")
        self.n_local = n_local
        self.device = device
        self._weights = [list(layer) for layer in expert_weights]
        self._buffer = list(expert_buffer)
        self._buffer_rows = [
            row_layout(b, f"expert_buffer[{i}]") for i, b in enumerate(self._buffer)
        ]
        self._expert_bytes = expert_bytes(self._buffer)
        self._offsets = np.cumsum([0] + [r.row_bytes for r in self._buffer_rows]).tolist()
        self._packed: torch.Tensor | None = None
        if mode == "staged":
            self._packed = torch.empty(
                n_local * self._expert_bytes, dtype=torch.uint8, device=device
            )
        lib = Path(lib_path) if lib_path is not None else find_nixl_capi()
        if device.type == "cuda":
            apply_ucx_defaults()
        self._weight_rows = [
            [row_layout(w, f"expert_weights[{li}][{ti}]") for ti, w in enumerate(layer)]
            for li, layer in enumerate(self._weights)
        ]
        weights_layout = [[r.as_tuple() for r in layer] for layer in self._weight_rows]
        regions = [span(b) for b in self._buffer]
        packed = None
        if self._packed is not None:
            regions.append((self._packed.data_ptr(), self._packed.numel()))
            packed = (self._packed.data_ptr(), self._expert_bytes)
        else:
            regions += [span(w) for layer in self._weights for w in layer]
        self.agent_name = f"eplbx-{uuid.uuid4().hex[:12]}-r{self.rank}"
        self._engine: _core.NixlEngine | None = _core.NixlEngine(
            str(lib),
            self.agent_name,
            self.rank,
            self.world_size,
            mode,
            "cuda" if device.type == "cuda" else "cpu",
            device.index or 0,
            self.timeout_s,
            n_local,
            weights_layout,
            [r.as_tuple() for r in self._buffer_rows],
            packed,
            regions,
        )
        blobs: list[Any] = [None] * self.world_size
        mine = (bytes(self._engine.local_blob()), socket.gethostname())
        dist.all_gather_object(blobs, mine, group=group)
        try:
            self._engine.connect([b for b, _host in blobs])
        except _core.PeerTransferError as e:  # a peer died or is unreachable during set-up
            self._engine.close(0.0)
            self._engine = None
            msg, peer, _layer = e.args
            raise TransferError(f"set-up failed: {msg}", peer=int(peer), layer=-1) from e
        hosts = [host for _b, host in blobs]
        #: Node index of every rank (ranks on one host share a node), learned at
        #: set-up; the driver prefers same-node sources with it.
        self.node_of_rank: list[int] = [sorted(set(hosts)).index(h) for h in hosts]
        self._sends: list[tuple[int, int, list[torch.Tensor]]] = []
        self._recvs: list[tuple[int, int, int]] = []
        log.debug("rank %d: NIXL agent %s ready (%s)", self.rank, self.agent_name, mode)

    # -- properties ---------------------------------------------------------------
    @property
    def staging_bytes(self) -> int:
        return 0 if self._packed is None else self._packed.numel()

    @property
    def prepared_lists_built(self) -> int:
        """Prepared descriptor lists built so far: ``world_size`` at set-up
        (one per peer plus one local), never more."""
        return self._live().prepared_lists_built

    @property
    def exchanges(self) -> int:
        """Layer exchanges run so far."""
        return self._live().exchanges

    @property
    def counters(self) -> dict[str, object]:
        """NIXL handle and message counters of this communicator:
        ``requests_live`` (0 between layers), ``requests_created``,
        ``prepared_lists_live`` / ``prepared_lists_built`` (``world_size``, never
        more), ``notifications_sent`` / ``_received``, ``inbox_entries``
        (buffered peer messages, 0 between rebalances), ``exchanges`` and
        ``failed_peers`` (ranks found dead or stuck)."""
        return dict(self._live("counters").counters())

    def _live(self, what: str = "") -> _core.NixlEngine:
        doing = f": cannot {what}" if what else ""
        if self._engine is None:
            raise RuntimeError(f"NixlCommunicator is closed{doing}; create a new one")
        if self._failure is not None and what not in ("", "counters"):
            raise RuntimeError(
                f"NixlCommunicator failed earlier{doing} ({self._failure}); close() it and "
                "create a new one"
            )
        return self._engine

    def _failed_with(self, e: _core.PeerTransferError) -> TransferError:
        """Records a peer failure (the communicator is unusable from now on:
        a dead peer's protocol state cannot be recovered) and converts it."""
        msg, peer, layer = e.args
        err = TransferError(str(msg), peer=int(peer), layer=int(layer))
        self._failure = err
        return err

    def end_rebalance(self, num_layers: int) -> None:
        """Closing handshake of a rebalance (one exchange without reads).

        A rank that missed a dead peer's last DONE learns here, from the other
        survivors, that the last layer completed everywhere, so every survivor
        reports the same committed layers. Raises :class:`TransferError` (with
        ``layer == num_layers``: every layer was committed) if a peer failed.
        """
        engine = self._live("end_rebalance")
        try:
            engine.barrier(num_layers)
        except _core.PeerTransferError as e:
            raise self._failed_with(e) from e

    # -- eplb-xfer fast path -------------------------------------------------------
    def check_tensors(
        self,
        expert_weights: Sequence[Sequence[torch.Tensor]],
        expert_buffer: Sequence[torch.Tensor],
    ) -> None:
        self._live("rebalance")
        if len(expert_weights) != len(self._weights):
            raise ValueError(
                f"expert_weights: {len(expert_weights)} layers, but this NixlCommunicator "
                f"registered {len(self._weights)}"
            )
        for layer, (got, bound) in enumerate(zip(expert_weights, self._weights)):
            self._check_bound(got, bound, f"expert_weights[{layer}]")
        self._check_bound(expert_buffer, self._buffer, "expert_buffer")

    def transfer_layer(
        self,
        plan: TransferPlan,
        layer_idx: int,
        weights: Sequence[torch.Tensor],
        buffer: Sequence[torch.Tensor],
        old_layer: np.ndarray,
    ) -> dict[int, int]:
        engine = self._live("transfer_layer")
        if not 0 <= layer_idx < len(self._weights):
            raise ValueError(f"layer_idx: {layer_idx} outside 0..{len(self._weights) - 1}")
        self._check_bound(weights, self._weights[layer_idx], f"expert_weights[{layer_idx}]")
        self._check_bound(buffer, self._buffer, "expert_buffer")
        synchronize(self.device)  # no READ may land while a stream still uses the buffer
        sends = plan.sends(layer_idx, self.rank)
        if self._packed is not None:
            for _expert, src_row, _readers in sends:
                self._pack(src_row, [w[src_row] for w in weights])
            synchronize(self.device)
        try:
            if not self.verify:
                stats = engine.exchange_plan(plan, layer_idx)
            else:
                sent = {src_row: [w[src_row] for w in weights] for _e, src_row, _r in sends}
                stats = self._verified_exchange(
                    layer_idx,
                    sent,
                    plan.recvs(layer_idx, self.rank),
                    lambda payload: engine.begin_plan(plan, layer_idx, payload),
                )
        except _core.PeerTransferError as e:
            raise self._failed_with(e) from e
        rows_per_peer = cast(list[tuple[int, int]], stats["rows_per_peer"])
        return {int(p): int(n) for p, n in rows_per_peer}

    def _verified_exchange(
        self,
        layer: int,
        sent: dict[int, list[torch.Tensor]],
        received: list[tuple[int, int, int, int]],
        begin: Callable[[bytes], list[bytes | None]],
    ) -> dict[str, object]:
        """An exchange whose READY carries checksums of the rows this rank
        serves; every received row is checked before DONE, so a mismatch means
        no rank can commit the layer. ``received`` holds ``(expert, src_rank,
        src_row, dst_row)``."""
        engine = self._live("execute")
        rows = sorted(sent)
        table = np.zeros(len(rows), dtype=_CHECKSUM_ENTRY)
        table["row"] = rows
        table["checksum"] = expert_checksums([sent[r] for r in rows])
        served: torch.Tensor | None = None
        if self._corrupt_layer == layer and rows:
            # Test-only fault: change a byte a peer will READ, after hashing it,
            # until every peer is done (restored on the way out).
            if self._packed is not None:
                served = self._packed[rows[0] * self._expert_bytes :][:1]
            else:
                served = sent[rows[0]][0].reshape(-1).view(torch.uint8)[:1]
            served ^= 0xFF
        try:
            payloads = begin(table.tobytes())
            try:
                expected: dict[tuple[int, int], int] = {}
                for src in {src for _e, src, _s, _d in received}:
                    entries = np.frombuffer(payloads[src] or b"", dtype=_CHECKSUM_ENTRY)
                    expected.update(
                        ((src, int(r)), int(c)) for r, c in zip(entries["row"], entries["checksum"])
                    )
                synchronize(self.device)
                got = row_checksums(self._buffer, [dst for _e, _src, _s, dst in received])
                for (expert, src, src_row, dst), value in zip(received, got):
                    want = expected.get((src, src_row))
                    if want != value:
                        engine.abort(
                            src,
                            f"checksum mismatch for expert {expert} read from rank {src} row "
                            f"{src_row} into buffer row {dst}: got {value:#018x}, source sent "
                            f"{'nothing' if want is None else f'{want:#018x}'}",
                        )
                return dict(engine.end())
            except _core.PeerTransferError:
                raise
            except BaseException as e:  # our own failure: peers must not wait for our DONE
                engine.abort(self.rank, f"rank {self.rank} failed while verifying: {e!r}")
                raise  # not reached: abort always raises
        finally:
            if served is not None:
                served ^= 0xFF

    @staticmethod
    def _check_bound(got: Sequence[torch.Tensor], bound: Sequence[torch.Tensor], name: str) -> None:
        if len(got) != len(bound) or any(a.data_ptr() != b.data_ptr() for a, b in zip(got, bound)):
            raise ValueError(
                f"{name}: not the tensors this NixlCommunicator registered; create a new one"
            )

    def _pack(self, slot: int, rows: Sequence[torch.Tensor]) -> None:
        assert self._packed is not None
        base = slot * self._expert_bytes
        for t, row in enumerate(rows):
            a, b = self._offsets[t], self._offsets[t + 1]
            self._packed[base + a : base + b].copy_(row.reshape(-1).view(torch.uint8))

    # -- vLLM-compatible interface -----------------------------------------------
    def add_send(self, tensors: Sequence[torch.Tensor], dst_rank: int, expert_id: int) -> None:
        self._live("add_send")
        dst = check_rank(dst_rank, "dst_rank", self.world_size)
        expert = check_expert(expert_id)
        ts = list(tensors)
        self._check_row_tensors(ts, "tensors")
        self._sends.append((dst, expert, ts))

    def add_recv(self, tensors: Sequence[torch.Tensor], src_rank: int, expert_id: int) -> None:
        self._live("add_recv")
        src = check_rank(src_rank, "src_rank", self.world_size)
        expert = check_expert(expert_id)
        ts = list(tensors)
        self._check_row_tensors(ts, "tensors")
        self._recvs.append((src, expert, self._buffer_row_of(ts)))

    def _check_row_tensors(self, ts: list[torch.Tensor], name: str) -> None:
        if len(ts) != len(self._buffer):
            raise ValueError(
                f"{name}: expected {len(self._buffer)} tensors (one row per weight tensor), "
                f"got {len(ts)}"
            )
        for i, (t, ref) in enumerate(zip(ts, self._buffer_rows)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
            if t.numel() * t.element_size() != ref.row_bytes or not t.is_contiguous():
                raise ValueError(
                    f"{name}[{i}]: expected a contiguous row of {ref.row_bytes} bytes, got "
                    f"{t.numel() * t.element_size()} bytes"
                )

    def _buffer_row_of(self, ts: list[torch.Tensor]) -> int:
        row = _common_row(ts, self._buffer_rows, self.n_local)
        if row is None:
            raise ValueError(
                "tensors: NIXL receives must target one row of expert_buffer "
                f"(addresses {[hex(t.data_ptr()) for t in ts]})"
            )
        return row

    def execute(self, old_indices: Any = None) -> None:
        engine = self._live("execute")
        sends, recvs = self._sends, self._recvs
        self._sends, self._recvs = [], []
        if old_indices is not None:
            old_layer = layer_row(old_indices, self._ctx_layer)
        elif self._ctx_old is not None:
            old_layer = self._ctx_old
        else:
            raise ValueError(
                "old_indices: needed (pass it to execute or call set_transfer_context first)"
            )
        if old_layer.shape[0] != self.n_local * self.world_size:
            raise ValueError(
                f"old_indices: expected {self.n_local * self.world_size} slots, got shape "
                f"{tuple(old_layer.shape)}"
            )
        layer = self._ctx_layer
        if layer is None:
            if self.mode == "zero_copy":
                raise ValueError(
                    "layer_idx: zero-copy reads need the layer; call "
                    "set_transfer_context(old_indices, layer_idx) first"
                )
            layer = 0
        if self.mode == "zero_copy" and layer >= len(self._weights):
            raise ValueError(f"layer_idx: {layer} outside 0..{len(self._weights) - 1}")
        per_rank = old_layer.reshape(self.world_size, self.n_local)

        def first_row(rank: int, expert: int, what: str) -> int:
            hits = np.flatnonzero(per_rank[rank] == expert)
            if hits.size == 0:
                raise ValueError(
                    f"expert_id: {expert} is not held by rank {rank} in old_indices ({what})"
                )
            return int(hits[0])

        reads: list[tuple[int, int, int]] = []
        received: list[tuple[int, int, int, int]] = []  # (expert, src, src_row, dst_row)
        local: list[tuple[int, int]] = []  # (src row on this rank, dst buffer row)
        for src, expert, dst_row in recvs:
            src_row = first_row(src, expert, "add_recv")
            if src == self.rank:
                local.append((src_row, dst_row))
            else:
                reads.append((src, src_row, dst_row))
                received.append((expert, src, src_row, dst_row))
        # Rows this rank serves, by the row peers read (the first holding the
        # expert): staged mode packs them there.
        served: dict[int, list[torch.Tensor]] = {}
        for _dst, expert, ts in sends:
            served.setdefault(first_row(self.rank, expert, "add_send"), ts)
        if self._packed is None:
            # Zero-copy serves rows straight from the registered weights, so what
            # add_send names must be one of this rank's rows holding the expert.
            mine = per_rank[self.rank]
            for _dst, expert, ts in sends:
                row = _common_row(ts, self._weight_rows[layer], self.n_local)
                if row is None or int(mine[row]) != expert:
                    raise ValueError(
                        f"tensors: zero-copy add_send for expert_id {expert} must pass rows of "
                        f"expert_weights[{layer}] that hold it in old_indices"
                    )
        # Everything validated: from here on bytes move.
        synchronize(self.device)
        if local:
            src_layer = self._weights[layer] if layer < len(self._weights) else None
            if src_layer is None:
                raise ValueError(f"layer_idx: {layer} has no registered weights")
            for s, d in local:
                for b, w in zip(self._buffer, src_layer):
                    b[d].copy_(w[s])
        if self._packed is not None and served:
            for slot, ts in served.items():
                self._pack(slot, ts)
            synchronize(self.device)
        try:
            if not self.verify:
                engine.exchange_reads(layer, reads)
            else:
                self._verified_exchange(
                    layer,
                    served,
                    received,
                    lambda payload: engine.begin_reads(layer, reads, payload),
                )
        except _core.PeerTransferError as e:
            raise self._failed_with(e) from e

    def close(self, linger_s: float | None = None) -> None:
        """Says goodbye to peers (so a final DONE still queued in UCX is not
        lost), waiting at most ``linger_s`` (default ``min(5, timeout_s)``) for
        theirs, then releases the agent, registrations and staging. Idempotent."""
        self._closed = True
        if self._engine is not None:
            self._engine.close(min(5.0, self.timeout_s) if linger_s is None else linger_s)
            self._engine = None
        self._packed = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close(linger_s=0.2)


_CHECKSUM_ENTRY = np.dtype([("row", "<u4"), ("checksum", "<u8")])


def _fault_layer(kind: str) -> int | None:
    """Test-only fault injection: ``EPLB_XFER_FAULT=<kind>:<layer>``."""
    spec = os.environ.get("EPLB_XFER_FAULT", "")
    name, _, layer = spec.partition(":")
    return int(layer) if name == kind and layer.isdigit() else None


def _common_row(
    ts: Sequence[torch.Tensor], layouts: Sequence[RowLayout], n_rows: int
) -> int | None:
    """The one row index at which every ``ts[i]`` starts in ``layouts[i]``, or None."""
    rows = set()
    for t, lay in zip(ts, layouts):
        off = t.data_ptr() - lay.base
        if off < 0 or off % lay.row_stride or off // lay.row_stride >= n_rows:
            return None
        rows.add(off // lay.row_stride)
    return rows.pop() if len(rows) == 1 else None


__all__ = ["NixlCommunicator", "apply_ucx_defaults", "find_nixl_capi"]
