"""NixlCommunicator: thin Python over the Rust NIXL transport.

Python finds NIXL's C API library, hands the tensors to the Rust core and
runs torch kernels on GPUs; Rust owns the agent, registrations, prepared
descriptor lists, the per-layer protocol, its deadline and the failure
agreement (on a worker thread that never needs the GIL), and on CPU the
layer's row copies and checksums too.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import uuid
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import _core
from ._tensors import (
    checksum_payload,
    copy_rows,
    copy_runs,
    deferred_sigint,
    expert_bytes,
    expert_checksums,
    read_checksum_payload,
    stream_context,
    validate_weights,
    wait_for_stream,
)
from .communicator import (
    EplbCommunicator,
    LayerOutcome,
    check_expert,
    check_node_of_rank,
    check_rank,
    check_row_tensors,
    layer_row,
)
from .errors import TransferError, TransferInterrupted
from .planning import TransferPlan

log = logging.getLogger("eplb_xfer.nixl")

MODES = ("zero_copy", "staged")

#: UCX settings applied (unless the user set them) before the first agent
#: exists, on GPUs: without GET zero-copy NIXL READ between GPUs runs over TCP
#: emulation (0.5 GB/s instead of about 1 TB/s on an H100).
UCX_DEFAULTS = {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y"}

_LIVE: weakref.WeakSet[NixlCommunicator] = weakref.WeakSet()


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
    """Sets :data:`UCX_DEFAULTS` unless already set (before any agent exists)."""
    for k, v in UCX_DEFAULTS.items():
        os.environ.setdefault(k, v)


@contextlib.contextmanager
def _abort_on_error(engine: _core.NixlEngine) -> Iterator[None]:
    """For a layer's work after validation: any exception (Ctrl-C included)
    tells the peers at once (``abort_local``), then propagates."""
    try:
        yield
    except BaseException as e:
        engine.abort_local("interrupted" if isinstance(e, KeyboardInterrupt) else "error")
        raise


def _error_of(result: dict[str, Any], what: str) -> TransferError:
    f = result["failure"]
    return TransferError(
        f"{what} failed: {f['detail']}",
        peer=int(f["culprit"]),
        layer=int(result.get("label", -1)),
        blame=str(f["blame"]),
    )


class NixlCommunicator(EplbCommunicator):
    """Moves expert rows with NIXL: zero staging, one exchange per layer.

    * ``mode="zero_copy"`` (default): every layer's weights and the buffer
      are registered once; rows move straight from the source's weights into
      the receiver's buffer. ``staging_bytes == 0``.
    * ``mode="staged"``: one packed send layer (``n_local`` expert slots);
      each local expert is packed once, however many peers read it.

    Per pair of ranks, rows move by READ (receiver-initiated) where the path
    does zero-copy GET (cma inside a host, cuda_ipc, RDMA) and by WRITE
    (sender-initiated, completion by notification) where GET would be
    emulated (tcp): ``direction="auto"|"read"|"write"``. Cross-node traffic
    runs in rounds in which each node exchanges with one other node
    (``schedule="rounds"``; ``"all"`` starts everything at once).

    Set-up (here) uses the process group once: NIXL metadata, layouts and
    node facts are all-gathered, descriptor lists prepared, and every pair
    moves 8 test bytes, so a transport that cannot work fails now on every
    rank (``TransferError`` with ``layer == -1``), naming the UCX settings.
    A rebalance uses NIXL notifications only.

    Args:
        group: process group of the EP ranks (None = default).
        expert_weights: per layer, the stacked tensors ``[n_local, ...]``.
        expert_buffer: one layer's worth of tensors like ``expert_weights[0]``.
        mode: ``"zero_copy"`` or ``"staged"``.
        timeout_s: deadline of each layer; past it every surviving rank raises
            :class:`TransferError` after the failure agreement (at most about
            ``min(1, timeout_s / 2)`` s per round, usually one or two rounds).
        verify: check every received expert against a checksum its source
            computed before the layer may commit; a mismatch fails the layer
            on every rank, naming the source.
        direction: ``"auto"``, ``"read"`` or ``"write"`` (same on every rank).
        schedule: ``"rounds"`` or ``"all"`` (same on every rank).
        node_of_rank: node id of every rank; default: detected (same kernel
            boot id and PID namespace = same node).
        lib_path: explicit ``libnixl_capi.so`` (default: found from the wheel).
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
        direction: str = "auto",
        schedule: str = "rounds",
        node_of_rank: Sequence[int] | None = None,
        lib_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(group)
        if not isinstance(verify, bool):
            raise TypeError(f"verify: expected a bool, got {verify!r}")
        for name, value in (("mode", mode), ("direction", direction), ("schedule", schedule)):
            if not isinstance(value, str):
                raise TypeError(f"{name}: expected a str, got {type(value).__name__}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
            raise TypeError(f"timeout_s: expected seconds as a number, got {timeout_s!r}")
        nodes = None
        if node_of_rank is not None:
            nodes = check_node_of_rank(node_of_rank, self.world_size)
        n_local, device = validate_weights(expert_weights, expert_buffer)
        self.mode = mode
        self.timeout_s = float(timeout_s)
        self.verify = verify
        self.n_local = n_local
        self.device = device
        self._weights = [list(layer) for layer in expert_weights]
        self._buffer = list(expert_buffer)
        self._row_bytes = [b[0].numel() * b.element_size() for b in self._buffer]
        self._expert_bytes = expert_bytes(self._buffer)
        self._offsets = np.cumsum([0, *self._row_bytes]).tolist()
        self._failure: TransferError | None = None
        self._sends: list[tuple[int, int, list[torch.Tensor]]] = []
        self._recvs: list[tuple[int, int, list[torch.Tensor]]] = []
        self._vllm_layer = -1
        self._vllm_committed: list[int] = []
        self._packed: torch.Tensor | None = None
        if mode == "staged":
            self._packed = torch.empty(
                n_local * self._expert_bytes, dtype=torch.uint8, device=device
            )
        lib = Path(lib_path) if lib_path is not None else find_nixl_capi()
        if device.type == "cuda":
            apply_ucx_defaults()
        self.agent_name = f"eplbx-{uuid.uuid4().hex[:12]}-r{self.rank}"
        self._engine: _core.NixlEngine | None = _core.NixlEngine(
            str(lib),
            self.agent_name,
            self.rank,
            self.world_size,
            mode,
            self.timeout_s,
            self._weights,
            self._buffer,
            self._packed,
            direction,
            schedule,
        )
        # Set-up moves 8 test bytes into buffer row 0 of every rank; they are
        # put back afterwards, so the caller's tensors are left as they were.
        probe_bytes = self._buffer[0][0].reshape(-1).view(torch.uint8)[:8]
        saved = probe_bytes.clone()
        try:
            blobs: list[Any] = [None] * self.world_size
            dist.all_gather_object(blobs, bytes(self._engine.local_blob()), group=group)
            probe_failures = self._engine.connect(blobs, nodes)
            probe_bytes.copy_(saved)
            everyone: list[Any] = [None] * self.world_size
            dist.all_gather_object(everyone, probe_failures, group=group)
            failed = [(r, p, why) for r, fs in enumerate(everyone) for p, why in fs]
            if failed:
                r, p, why = failed[0]
                raise TransferError(
                    f"set-up failed between ranks {r} and {p}: {why}",
                    peer=int(p),
                    layer=-1,
                    blame="setup",
                )
            self._engine.start()
        except BaseException:
            self._engine.close(0.0)
            self._engine = None
            raise
        #: Node index of every rank (learned at set-up, or as given).
        self.node_of_rank: list[int] = list(self._engine.node_of_rank)
        #: Per rank: "read" / "write" (how rows move with it) or "self".
        self.directions: list[str] = list(self._engine.directions)
        _LIVE.add(self)
        log.debug(
            "rank %d: NIXL agent %s ready (%s, nodes %s, directions %s)",
            self.rank,
            self.agent_name,
            mode,
            self.node_of_rank,
            self.directions,
        )

    # -- properties ---------------------------------------------------------------
    @property
    def staging_bytes(self) -> int:
        return 0 if self._packed is None else self._packed.numel()

    @property
    def needs_profile_buffer_reservation(self) -> bool:
        """False: nothing is allocated at transfer time (the staged send layer,
        if any, was allocated when this communicator was built)."""
        return False

    @property
    def exchanges(self) -> int:
        """Layer exchanges run so far (including closing handshakes)."""
        n: Any = self.counters["exchanges"]
        return int(n)

    @property
    def counters(self) -> dict[str, object]:
        """NIXL handle and message counters (never waits for a running layer):
        ``requests_live`` (0 between layers), ``requests_created``,
        ``prepared_lists_live`` (built once at set-up), ``notifications_sent``
        / ``_received``, ``buffered`` (peer messages kept for later),
        ``ignored_messages``, ``exchanges`` and ``failed_peers``."""
        return dict(self._live("counters", allow_failed=True).counters())

    def num_layers_or_none(self) -> int | None:
        return len(self._weights)

    def num_slots_or_none(self) -> int | None:
        return self.n_local * self.world_size

    def _live(self, what: str, *, allow_failed: bool = False) -> _core.NixlEngine:
        if self._engine is None:
            raise RuntimeError(f"NixlCommunicator is closed: cannot {what}; create a new one")
        if self._failure is not None and not allow_failed:
            raise RuntimeError(
                f"NixlCommunicator failed earlier: cannot {what} ({self._failure}); close() it "
                "and create a new one"
            )
        return self._engine

    def _fail(self, err: TransferError) -> TransferError:
        self._failure = err
        return err

    # -- eplb-xfer's way ------------------------------------------------------------
    def check_tensors(
        self,
        expert_weights: Sequence[Sequence[torch.Tensor]],
        expert_buffer: Sequence[torch.Tensor],
    ) -> None:
        engine = self._live("rebalance")
        engine.check_bound([list(layer) for layer in expert_weights], list(expert_buffer))

    def rebalance_layer(
        self,
        plan: TransferPlan,
        layer_idx: int,
        weights: Sequence[torch.Tensor],
        buffer: Sequence[torch.Tensor],
        old_layer: np.ndarray,
    ) -> LayerOutcome:
        engine = self._live("rebalance_layer")
        if not 0 <= layer_idx < len(self._weights):
            raise ValueError(f"layer_idx: {layer_idx} outside 0..{len(self._weights) - 1}")
        if plan.ep_size != self.world_size or plan.n_local != self.n_local:
            raise ValueError(
                f"plan: made for {plan.ep_size} ranks x {plan.n_local} rows, but this "
                f"communicator has {self.world_size} x {self.n_local}"
            )
        if self.device.type == "cpu":
            # The whole layer in one call: copies, exchange, checksums, commit.
            res = engine.exchange_plan(
                plan, layer_idx, True, "host" if self.verify else "off", None
            )
            return self._outcome(res, f"layer {layer_idx}")
        return self._device_layer(engine, plan, layer_idx, weights, buffer)

    def _device_layer(
        self,
        engine: _core.NixlEngine,
        plan: TransferPlan,
        layer: int,
        weights: Sequence[torch.Tensor],
        buffer: Sequence[torch.Tensor],
    ) -> LayerOutcome:
        rank = self.rank
        sends = plan.sends(layer, rank)
        with _abort_on_error(engine):
            with stream_context(self._stream):
                copy_rows(buffer, weights, [(s, d) for _e, s, d in plan.local_copies(layer, rank)])
                for _e, src_row, _readers in sends if self._packed is not None else ():
                    self._pack(src_row, [w[src_row] for w in weights])
                payloads = None
                if self.verify:
                    payloads = self._served_payloads(
                        [(src_row, r) for _e, src_row, readers in sends for r in readers],
                        {src_row: [w[src_row] for w in weights] for _e, src_row, _r in sends},
                    )
            # No byte moves into the buffer before the stream's work on it ran.
            wait_for_stream(self.device, self._stream)
        res = engine.exchange_plan(plan, layer, False, "caller" if self.verify else "off", payloads)
        if res["state"] == "landed":
            received = [(src, s, d) for _e, src, s, d in plan.recvs(layer, rank)]
            res = self._verify_landed(engine, res, received)
        outcome = self._outcome(res, f"layer {layer}", commit_later=True)
        if outcome.committed:
            with deferred_sigint(), stream_context(self._stream):
                copy_rows(buffer, buffer, [(s, d) for _e, s, d in plan.dup_fills(layer, rank)])
                copy_runs(weights, buffer, plan.changed_runs(layer, rank))
        if outcome.interrupted:
            raise TransferInterrupted(
                f"interrupted at layer {layer}, after it committed on every rank",
                layer=layer + 1,
                committed_layers=[],
            )
        return outcome

    def _verify_landed(
        self,
        engine: _core.NixlEngine,
        res: dict[str, Any],
        received: list[tuple[int, int, int]],
    ) -> dict[str, Any]:
        """Checks received rows ``(src_rank, src_row, dst_row)`` against their
        sources' checksums; says DONE or names the first bad source."""
        with _abort_on_error(engine):
            payloads = res["payloads"]
            with stream_context(self._stream):
                got = expert_checksums([[b[d] for b in self._buffer] for _s, _r, d in received])
            for (src, src_row, _d), value in zip(received, got):
                if read_checksum_payload(payloads[src]).get(src_row) != value:
                    log.warning(
                        "rank %d: checksum mismatch on data from rank %d (row %d)",
                        self.rank,
                        src,
                        src_row,
                    )
                    return dict(engine.abort_verdict(src))
        return dict(engine.done())

    def _served_payloads(
        self, serves: list[tuple[int, int]], rows: dict[int, list[torch.Tensor]]
    ) -> list[tuple[int, bytes]]:
        """READY payloads: for each reader, checksums of the rows it reads."""
        order = sorted(rows)
        sums = dict(zip(order, expert_checksums([rows[r] for r in order])))
        by_reader: dict[int, list[int]] = {}
        for row, reader in serves:
            by_reader.setdefault(reader, []).append(row)
        return [
            (reader, checksum_payload(rs, [sums[r] for r in rs]))
            for reader, rs in sorted(by_reader.items())
        ]

    def _outcome(self, res: dict[str, Any], what: str, commit_later: bool = False) -> LayerOutcome:
        interrupted = bool(res.get("interrupted"))
        if res["state"] == "failed":
            err = self._fail(_error_of(res, what))
            if interrupted:
                raise TransferInterrupted(
                    f"{what}: interrupted ({err})", layer=err.layer, committed_layers=[]
                ) from err
            raise err
        per_peer = {int(p): int(n) for p, n in res.get("rows_per_peer", [])}
        pending = res.get("pending")
        if pending is not None:
            self._failure = TransferError(
                f"a peer failed: {pending['detail']}",
                peer=int(pending["culprit"]),
                layer=int(res.get("label", -1)) + 1,
                blame=str(pending["blame"]),
            )
        if interrupted and not commit_later:
            raise TransferInterrupted(
                f"{what}: interrupted after the layer committed everywhere",
                layer=int(res.get("label", -1)) + 1,
                committed_layers=[],
            )
        return LayerOutcome(committed=True, rows_per_peer=per_peer, interrupted=interrupted)

    def begin_rebalance(self, plan: TransferPlan) -> None:
        """Opening handshake (an exchange without data) carrying the plan's
        fingerprint: ranks that disagree on the placements (or on anything
        the plan was made from) all raise :class:`TransferError` here, before
        any row or buffer byte moves."""
        engine = self._live("begin_rebalance")
        res = engine.barrier(0, plan.fingerprint)
        self._outcome(res, "the opening handshake")

    def end_rebalance(self, num_layers: int) -> None:
        """Closing handshake (an exchange without data): a rank that missed a
        dead peer's last DONE learns here that the last layer completed.
        Raises :class:`TransferError` (``layer == num_layers``) if a peer failed."""
        engine = self._live("end_rebalance")
        res = engine.barrier(num_layers)
        self._outcome(res, "the closing handshake")

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
        ts = check_row_tensors(tensors, "tensors", self._row_bytes, receive=False)
        self._sends.append((dst, expert, ts))

    def add_recv(self, tensors: Sequence[torch.Tensor], src_rank: int, expert_id: int) -> None:
        self._live("add_recv")
        src = check_rank(src_rank, "src_rank", self.world_size)
        expert = check_expert(expert_id)
        ts = check_row_tensors(tensors, "tensors", self._row_bytes, receive=True)
        self._recvs.append((src, expert, ts))

    def execute(self, old_indices: Any = None) -> None:
        """Moves the queued rows of the context layer. Returns once this
        rank's receives landed and every peer finished reading its rows
        (the caller may then overwrite them). Receive targets outside the
        registered buffer land in the registered buffer first and are copied
        after the layer committed (one extra local copy, no extra memory)."""
        engine = self._live("execute")
        self.acquire("execute")
        try:
            self._execute(engine, old_indices)
        finally:
            self.release()

    def _execute(self, engine: _core.NixlEngine, old_indices: Any) -> None:
        sends, recvs = self._sends, self._recvs
        self._sends, self._recvs = [], []
        layer = self._ctx_layer
        if old_indices is not None:
            old_layer = layer_row(old_indices, layer)
        elif self._ctx_old is not None:
            old_layer = self._ctx_old
        else:
            raise ValueError(
                "old_indices: needed (pass it to execute or call set_transfer_context first)"
            )
        if layer is None:
            if self._packed is None:
                raise ValueError(
                    "layer_idx: zero-copy reads need the layer; call "
                    "set_transfer_context(old_indices, layer_idx) first"
                )
            layer = 0  # staged mode serves from the packed layer, whatever the layer
        slots = self.n_local * self.world_size
        if old_layer.shape[0] != slots:
            raise ValueError(
                f"old_indices: expected {slots} slots, got shape {tuple(old_layer.shape)}"
            )
        # Receives: rows of the registered buffer, or foreign rows that land
        # in a free registered row first.
        targets: list[tuple[int, int, list[torch.Tensor], int | None]] = []
        used: set[int] = set()
        for src, expert, ts in recvs:
            if src == self.rank:
                raise ValueError(
                    f"src_rank: {src} is this rank; local moves are the caller's copies"
                )
            row = engine.row_of(ts, "buffer", 0)
            targets.append((src, expert, ts, row))
            if row is not None:
                used.add(int(row))
        free = iter(r for r in range(self.n_local) if r not in used)
        mapped_recvs: list[tuple[int, int, int]] = []
        foreign: list[tuple[int, list[torch.Tensor]]] = []
        for src, expert, ts, row in targets:
            if row is None:
                landing = next(free, None)
                if landing is None:
                    raise ValueError(
                        f"tensors: {len(targets)} receives do not fit the {self.n_local} rows of "
                        "the registered buffer"
                    )
                foreign.append((landing, ts))
                row = landing
            mapped_recvs.append((expert, src, int(row)))
        served: dict[int, list[torch.Tensor]] = {}  # row -> the tensors add_send gave
        mine = old_layer[self.rank * self.n_local : (self.rank + 1) * self.n_local]
        for dst, expert, ts in sends:
            if dst == self.rank:
                raise ValueError(f"dst_rank: {dst} is this rank; local moves are the caller's")
            if self._packed is None:
                row = engine.row_of(ts, "weights", layer)
                if row is None or int(mine[int(row)]) != expert:
                    raise ValueError(
                        f"tensors: zero-copy add_send for expert_id {expert} must pass rows of "
                        f"expert_weights[{layer}] that hold it in old_indices"
                    )
        mapped = engine.map_experts(
            layer,
            np.ascontiguousarray(old_layer, dtype=np.int64).tobytes(),
            mapped_recvs,
            [(expert, dst) for dst, expert, _ts in sends],
        )
        for (_dst, _expert, ts), row in zip(sends, mapped.send_rows):
            served.setdefault(int(row), ts)
        # Validated: from here on bytes move, and any error tells the peers.
        if layer <= self._vllm_layer:
            self._vllm_committed = []  # a new rebalance began
        self._vllm_layer = layer
        with _abort_on_error(engine):
            with stream_context(self._stream):
                for slot, ts in served.items() if self._packed is not None else ():
                    self._pack(slot, ts)
                payloads = None
                if self.verify:
                    serves = [
                        (int(row), dst) for (dst, _e, _t), row in zip(sends, mapped.send_rows)
                    ]
                    payloads = self._served_payloads(serves, served)
            wait_for_stream(self.device, self._stream)
        res = engine.exchange_mapped(mapped, "caller" if self.verify else "off", payloads)
        if res["state"] == "landed":
            res = self._verify_landed(engine, res, [(s, r, d) for s, r, d in mapped.recvs])
        try:
            outcome = self._outcome(res, f"layer {layer}", commit_later=True)
        except (TransferError, TransferInterrupted) as e:
            e.committed_layers = list(self._vllm_committed)
            raise
        if foreign:
            with deferred_sigint(), stream_context(self._stream):
                for landing, ts in foreign:
                    for t, b in zip(ts, self._buffer):
                        t.copy_(b[landing].reshape(t.shape).view(t.dtype))
        if outcome.interrupted:
            # The layer completed everywhere (peers commit it and fail at
            # their next call); this rank stops now, before its caller
            # copies the layer in.
            self._failure = TransferError(
                f"rank {self.rank} was interrupted", peer=self.rank, layer=layer + 1,
                blame="interrupted",
            )  # fmt: skip
            raise TransferInterrupted(
                f"interrupted after layer {layer} completed on every rank; not applied here",
                layer=layer,
                committed_layers=list(self._vllm_committed),
            )
        self._vllm_committed.append(layer)

    def close(self, linger_s: float | None = None) -> None:
        """Says goodbye to peers, waiting at most ``linger_s`` (default 0.5 s;
        0 after a failure) for live peers to confirm they got everything this
        rank sent, then releases the agent, registrations and staging.
        Returns at once for peers known dead. Idempotent; in a forked child
        it only forgets the parent's communicator."""
        if linger_s is None:
            linger_s = 0.0 if self._failure is not None else 0.5
        if (
            isinstance(linger_s, bool)
            or not isinstance(linger_s, (int, float))
            or not 0 <= linger_s <= 600
        ):
            raise ValueError(f"linger_s: expected seconds in [0, 600], got {linger_s!r}")
        self._closed = True
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close(float(linger_s))
        self._packed = None
        _LIVE.discard(self)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close(linger_s=0.2)


@atexit.register
def _close_all() -> None:
    """Closes communicators still open at exit, so no agent outlives Python."""
    for comm in list(_LIVE):
        with contextlib.suppress(Exception):
            comm.close(linger_s=0.2)


__all__ = ["NixlCommunicator", "apply_ucx_defaults", "find_nixl_capi"]
