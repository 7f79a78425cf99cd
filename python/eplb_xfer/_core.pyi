"""Typed contract of the Rust extension ``eplb_xfer._core``.

No function here takes a memory address: tensors are passed as objects and
their geometry is read from them (through ``torch.Tensor``'s own methods).
"""

from os import PathLike
from typing import Any

import torch

__version__: str

class NixlUnavailable(RuntimeError):
    """NIXL's C API library could not be found or loaded."""

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
    @property
    def fingerprint(self) -> int:
        """Hash of the inputs (placements, ep size, nodes); equal on ranks
        that planned the same rebalance."""
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
    def moving_layers(self) -> list[bool]:
        """``layer_moves`` of every layer."""
    def local_rows(self, rank: int) -> list[int]:
        """Per layer, rows ``rank`` fills by a local copy or a duplicate fill."""
    def cross_node_rows(self, node_of_rank: list[int]) -> int:
        """Expert rows received from another node, over all layers and ranks.
        Raises ``ValueError`` if ``node_of_rank`` has the wrong length."""
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

class MappedLayer:
    """One layer's receives and sends (vLLM's call style) mapped to rows by
    ``NixlEngine.map_experts``."""

    @property
    def served_rows(self) -> list[int]:
        """Rows this rank serves, each once (staged mode packs them)."""
    @property
    def recvs(self) -> list[tuple[int, int, int]]:
        """``(src_rank, src_row, dst_row)``, sorted."""
    @property
    def send_rows(self) -> list[int]:
        """The row serving each send, in the order the sends were given."""

class NixlEngine:
    """One rank's NIXL transport: agent, registrations, prepared lists, and a
    worker thread that runs the per-layer protocol and the failure
    agreement (it answers peers even between calls).

    Raises ``NixlUnavailable`` if the library cannot be loaded, ``TypeError``
    / ``ValueError`` naming the argument on unusable tensors or options
    (non-contiguous rows, two rows sharing memory, mixed devices, tensors
    requiring grad), ``RuntimeError`` on NIXL failures.
    """

    def __init__(
        self,
        lib_path: str | PathLike[str],
        agent_name: str,
        rank: int,
        world: int,
        mode: str,
        timeout_s: float,
        weights: list[list[torch.Tensor]],
        buffer: list[torch.Tensor],
        packed: torch.Tensor | None = None,
        direction: str = "auto",
        schedule: str = "rounds",
    ) -> None: ...
    def local_blob(self) -> bytes:
        """Agent name, NIXL metadata, layout and node facts, for every peer."""
    def connect(
        self, blobs: list[bytes], node_of_rank: list[int] | None = None
    ) -> list[tuple[int, str]]:
        """Loads all ranks' blobs (index = rank), agrees on the topology,
        prepares descriptor lists once and moves 8 test bytes with every
        peer; returns ``(peer, why)`` for each failed test (naming the UCX
        settings in effect)."""
    def start(self) -> None:
        """Starts the worker thread (after every rank's tests passed)."""
    @property
    def node_of_rank(self) -> list[int]: ...
    @property
    def directions(self) -> list[str]:
        """Per rank: ``"read"``, ``"write"`` or ``"self"``."""
    @property
    def rounds(self) -> list[int]:
        """Per rank: schedule round of transfers with it (0: no waiting)."""
    @property
    def n_local(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    def check_bound(self, weights: list[list[torch.Tensor]], buffer: list[torch.Tensor]) -> None:
        """``ValueError`` unless these are the registered tensors, unchanged."""
    def row_of(self, tensors: list[torch.Tensor], what: str, layer: int = 0) -> int | None:
        """Row ``r`` if ``tensors[i]`` is row ``r`` of the registered ``what``
        (``"weights"`` of ``layer``, or ``"buffer"``) tensors, else ``None``."""
    def map_experts(
        self,
        layer_idx: int,
        old_row: bytes,
        recvs: list[tuple[int, int, int]],
        sends: list[tuple[int, int]],
    ) -> MappedLayer:
        """Maps ``(expert, src_rank, dst_row)`` receives and ``(expert,
        dst_rank)`` sends to rows with ``old_row`` (int64 ``[P]``): a source
        serves the first of its rows holding the expert. ``ValueError``
        naming the argument if an expert is not held or a rank is not a peer."""
    def exchange_plan(
        self,
        plan: TransferPlan,
        layer: int,
        host: bool,
        verify: str = "off",
        payloads: list[tuple[int, bytes]] | None = None,
    ) -> dict[str, Any]:
        """This rank's part of ``layer`` of ``plan`` (see the module docs of
        ``eplb_xfer.nixl``). Returns a result dict: ``state`` (``"landed"``,
        ``"committed"`` or ``"failed"``), ``interrupted``, and per state
        ``payloads`` / ``label``, ``rows_per_peer``, ``bytes_received``,
        ``seconds``, ``pending`` (a failure dict or None) / ``failure``
        (``culprit``, ``blame``, ``detail``)."""
    def exchange_mapped(
        self,
        mapped: MappedLayer,
        verify: str = "off",
        payloads: list[tuple[int, bytes]] | None = None,
    ) -> dict[str, Any]:
        """Like ``exchange_plan`` for a ``MappedLayer``."""
    def barrier(self, label: int, fingerprint: int | None = None) -> dict[str, Any]:
        """An exchange without data (opening / closing handshake)."""
    def done(self) -> dict[str, Any]:
        """After a ``"landed"`` result: the data verified; waits for the outcome."""
    def abort_verdict(self, culprit: int) -> dict[str, Any]:
        """After a ``"landed"`` result: ``culprit``'s data failed verification;
        peers are told; waits for the agreed outcome."""
    def abort_local(self, why: str) -> None:
        """This rank failed after validation (``"error"`` or
        ``"interrupted"``): peers are told at once; never waits."""
    def counters(self) -> dict[str, Any]:
        """``exchanges``, ``prepared_lists_live``, ``requests_created`` /
        ``_live``, ``notifications_sent`` / ``_received``, ``buffered``,
        ``ignored_messages``, ``failed_peers``. Never waits."""
    def close(self, linger_s: float = 0.5) -> None:
        """Says goodbye, waits at most ``linger_s`` for live peers to confirm,
        releases everything (idempotent)."""

def check_layout(weights: list[list[torch.Tensor]], buffer: list[torch.Tensor]) -> None:
    """``ValueError`` naming the tensor unless every row is contiguous, the
    layers match the buffer row for row, all share one device, and no two
    rows (any layer, tensor, or the buffer) share memory."""

def copy_rows(
    dst: list[torch.Tensor], src: list[torch.Tensor], pairs: list[tuple[int, int]]
) -> None:
    """Row ``s`` of every ``src`` tensor -> row ``d`` of the matching ``dst``
    tensor, for each ``(s, d)`` (CPU tensors). ``ValueError`` (nothing
    copied) on a row out of range or mismatched row sizes."""

def expert_checksums(experts: list[list[torch.Tensor]]) -> list[int]:
    """The ``verify`` checksum of each expert given as its rows (contiguous
    CPU tensors)."""

def checksums_from_parts(parts: list[list[tuple[int, int, int]]]) -> list[int]:
    """Expert checksums from per-row parts computed elsewhere (torch on a
    device): ``[sum, block-weighted sum, column-weighted sum]`` per row."""

def checksum_block_width(n: int) -> int:
    """Block width of the checksum for a row of ``n`` bytes."""

def live_agents() -> int:
    """NIXL agents alive in this process (0 once every communicator is closed)."""

def local_node_key() -> str:
    """This process's node key (kernel boot id and PID namespace)."""

def node_ids(keys: list[str]) -> list[int]:
    """Dense node ids, in order of first appearance, of per-rank node keys."""
