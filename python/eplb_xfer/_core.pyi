"""Typed contract of the Rust extension ``eplb_xfer._core``."""

from os import PathLike

__version__: str

class NixlUnavailable(RuntimeError):
    """NIXL's C API library could not be found or loaded."""

class PeerTransferError(RuntimeError):
    """A peer failed or timed out during a layer exchange.

    ``args`` is ``(message: str, peer: int, layer: int)``.
    """

class TransferPlan:
    """Per-rank, per-layer transfer plan, computed once in Rust.

    Rows are local slot indices ``0..n_local`` of the rank in question.
    Every method raises ``IndexError`` for a layer or rank out of range.
    """

    @property
    def num_layers(self) -> int: ...
    @property
    def num_slots(self) -> int: ...
    @property
    def ep_size(self) -> int: ...
    @property
    def n_local(self) -> int: ...
    def unchanged(self, layer: int, rank: int) -> list[int]:
        """Rows whose expert stays (or whose new slot is empty, -1)."""
    def local_copies(self, layer: int, rank: int) -> list[tuple[int, int, int]]:
        """``(expert, src_row, dst_row)``: experts this rank already holds."""
    def recvs(self, layer: int, rank: int) -> list[tuple[int, int, int, int]]:
        """``(expert, src_rank, src_row, dst_row)``: one per missing expert,
        sorted by ``(src_rank, dst_row)``."""
    def dup_fills(self, layer: int, rank: int) -> list[tuple[int, int, int]]:
        """``(expert, src_row, dst_row)``: copies of a received primary row."""
    def sends(self, layer: int, rank: int) -> list[tuple[int, int, list[int]]]:
        """``(expert, src_row, readers)``: each expert row served once."""
    def changed_runs(self, layer: int, rank: int) -> list[tuple[int, int]]:
        """Changed rows merged into ``(start, length)`` runs."""
    def layer_moves(self, layer: int) -> bool:
        """True if any rank changes any row of ``layer``."""
    def summary(self) -> dict[str, int]:
        """Totals: ``num_layers, num_slots, ep_size, recvs, local_copies, dup_fills``."""

def plan_rebalance_bytes(
    old: bytes,
    new: bytes,
    num_layers: int,
    num_slots: int,
    ep_size: int,
    node_of_rank: list[int] | None = None,
) -> TransferPlan:
    """Plans from little-endian int64 ``[num_layers, num_slots]`` buffers.

    Raises ``ValueError`` naming the argument and value on invalid placements.
    """

def rebalance_experts_bytes(
    weight: bytes,
    num_layers: int,
    num_logical_experts: int,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old: bytes | None = None,
    method: str = "migrate",
    max_imbalance: float = 0.0,
    threads: int = 0,
) -> bytes:
    """EPLB placement (``phy2log``) from little-endian float64 ``weight``
    ``[num_layers, num_logical_experts]`` and optional int64 ``old``
    ``[num_layers, num_replicas]``; returns int64 ``[num_layers, num_replicas]``.

    ``method``: ``"stock"`` (DeepSeek's algorithm), ``"relabel"`` (stock renamed
    to overlap ``old``) or ``"migrate"`` (migration-aware; stock without
    ``old``). ``threads``: workers over layers, 0 = all cores (the result does
    not depend on it). The GIL is released while planning. Raises
    ``ValueError`` naming the argument and value on bad input.
    """

def log2phy_logcnt_bytes(
    phy2log: bytes, num_layers: int, num_slots: int, num_logical_experts: int
) -> tuple[bytes, int, bytes]:
    """``(log2phy, max_count, logcnt)`` of an int64 ``[num_layers, num_slots]``
    placement: int64 ``[num_layers, num_logical_experts, max_count]`` replica
    slots in slot order (``-1`` padding) and int64 ``[num_layers,
    num_logical_experts]`` counts. Raises ``ValueError`` on a bad entry.
    """

def host_copy_rows(
    dst: list[tuple[int, int, int]],
    src: list[tuple[int, int, int]],
    n_rows: int,
    pairs: list[tuple[int, int]],
) -> None:
    """Copies row ``s`` to row ``d`` of every host tensor, for each ``(s, d)``.

    Layouts are ``(base, row_stride, row_bytes)`` of live CPU tensors with at
    least ``n_rows`` rows. Raises ``ValueError`` (nothing copied) on a row out of
    range or mismatched row sizes.
    """

class NixlEngine:
    """One rank's NIXL endpoint (agent, registrations, prepared lists, protocol).

    Raises ``NixlUnavailable`` if the library cannot be loaded, ``ValueError``
    on an invalid layout, ``RuntimeError`` on NIXL failures.
    """

    def __init__(
        self,
        lib_path: str | PathLike[str],
        agent_name: str,
        rank: int,
        world: int,
        mode: str,
        device: str,
        device_id: int,
        timeout_s: float,
        n_local: int,
        weights: list[list[tuple[int, int, int]]],
        buffer: list[tuple[int, int, int]],
        packed: tuple[int, int] | None,
        regions: list[tuple[int, int]],
    ) -> None: ...
    def local_blob(self) -> bytes:
        """Agent name, NIXL metadata and layout, for every peer."""
    def connect(self, blobs: list[bytes]) -> None:
        """Loads all ranks' blobs (index = rank); prepares lists once."""
    def exchange_plan(self, plan: TransferPlan, layer: int) -> dict[str, object]:
        """This rank's part of ``layer``; returns ``rows_per_peer``,
        ``bytes_read``, ``seconds``. Raises ``PeerTransferError``."""
    def exchange_reads(self, layer: int, reads: list[tuple[int, int, int]]) -> dict[str, object]:
        """One exchange for explicit ``(src_rank, src_row, dst_row)`` reads."""
    def begin_plan(
        self, plan: TransferPlan, layer: int, ready_payload: bytes
    ) -> list[bytes | None]:
        """First half of an exchange: READY (carrying ``ready_payload``) and this
        rank's reads of ``layer``; returns every rank's READY payload (``None``
        for ranks this rank does not read from) once all reads completed.
        Follow with :meth:`end` or :meth:`abort`. Raises ``PeerTransferError``."""
    def begin_reads(
        self, layer: int, reads: list[tuple[int, int, int]], ready_payload: bytes
    ) -> list[bytes | None]:
        """:meth:`begin_plan` for explicit ``(src_rank, src_row, dst_row)`` reads."""
    def end(self) -> dict[str, object]:
        """Second half: DONE, then wait for every peer's; on success the layer
        may be committed. Raises ``PeerTransferError``."""
    def abort(self, culprit: int, reason: str) -> None:
        """Abandons the open exchange blaming ``culprit`` (peers are told at
        once); always raises ``PeerTransferError``."""
    def barrier(self, label: int) -> None:
        """End-of-rebalance handshake (an exchange without reads); ``label`` is
        the layer reported on failure. Raises ``PeerTransferError``."""
    def counters(self) -> dict[str, object]:
        """``exchanges``, ``prepared_lists_built`` / ``_live``,
        ``requests_created`` / ``_live``, ``notifications_sent`` /
        ``_received``, ``inbox_entries``, ``failed_peers``."""
    @property
    def prepared_lists_built(self) -> int: ...
    @property
    def exchanges(self) -> int: ...
    def close(self, linger_s: float = 5.0) -> None:
        """Says goodbye to peers (waits at most ``linger_s`` for theirs), then
        releases agent and registrations (idempotent)."""

def live_agents() -> int:
    """NIXL agents alive in this process (0 once every communicator is closed)."""

def host_expert_checksums(experts: list[list[tuple[int, int]]]) -> list[int]:
    """``verify=True`` checksums of host experts, each given as its contiguous
    rows ``(addr, nbytes)``; same values as the torch implementation.
    Raises ``ValueError`` on a null or overflowing row."""
