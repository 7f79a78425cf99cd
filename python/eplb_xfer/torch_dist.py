"""torch.distributed P2P communicator: the baseline (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from . import _core
from ._tensors import check_memory, stream_context, validate_weights
from .communicator import (
    EplbCommunicator,
    check_expert,
    check_node_of_rank,
    check_rank,
    check_row_tensors,
)


class TorchCommunicator(EplbCommunicator):
    """Sends and receives expert rows with ``batch_isend_irecv``.

    Messages between a pair of ranks are ordered by expert id on both sides,
    so sender and receiver agree without any extra handshake. A baseline: a
    dead peer makes it wait for torch.distributed's own timeout, and it has
    no ``verify`` option.

    At set-up it learns which ranks share a node (same kernel boot id and
    PID namespace, like the NIXL communicator), so the driver prefers
    same-node sources: ``node_of_rank``. With ``expert_weights`` and
    ``expert_buffer`` (as vLLM's factory passes them) it also knows the layer
    count and slot count, and ``set_transfer_context`` checks against them.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        expert_weights: Sequence[Sequence[torch.Tensor]] | None = None,
        expert_buffer: Sequence[torch.Tensor] | None = None,
        *,
        node_of_rank: Sequence[int] | None = None,
    ) -> None:
        super().__init__(group)
        self._num_layers: int | None = None
        self._num_slots: int | None = None
        self._row_bytes: list[int] | None = None
        if expert_weights is not None or expert_buffer is not None:
            if expert_weights is None or expert_buffer is None:
                raise ValueError(
                    "expert_weights: pass both expert_weights and expert_buffer, or neither"
                )
            n_local, _dev = validate_weights(expert_weights, expert_buffer)
            check_memory(expert_weights, expert_buffer)
            self._num_layers = len(expert_weights)
            self._num_slots = n_local * self.world_size
            self._row_bytes = [b[0].numel() * b.element_size() for b in expert_buffer]
        if node_of_rank is not None:
            self.node_of_rank: list[int] = check_node_of_rank(node_of_rank, self.world_size)
        else:
            keys: list[Any] = [None] * self.world_size
            dist.all_gather_object(keys, _core.local_node_key(), group=group)
            self.node_of_rank = list(_core.node_ids([str(k) for k in keys]))
        self._sends: list[tuple[int, int, list[torch.Tensor]]] = []
        self._recvs: list[tuple[int, int, list[torch.Tensor]]] = []

    def num_layers_or_none(self) -> int | None:
        return self._num_layers

    def num_slots_or_none(self) -> int | None:
        return self._num_slots

    def _peer(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def _rows(self, tensors: Any, receive: bool) -> list[torch.Tensor]:
        if self._row_bytes is not None:
            return check_row_tensors(tensors, "tensors", self._row_bytes, receive=receive)
        ts = list(tensors)
        for i, t in enumerate(ts):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tensors[{i}]: expected a torch.Tensor, got {type(t).__name__}")
            if receive and not t.is_contiguous():
                raise ValueError(f"tensors[{i}]: receive targets must be contiguous tensors")
        return ts

    def add_send(self, tensors: Sequence[torch.Tensor], dst_rank: int, expert_id: int) -> None:
        self._check_open("add_send")
        dst = check_rank(dst_rank, "dst_rank", self.world_size)
        rows = [t if t.is_contiguous() else t.contiguous() for t in self._rows(tensors, False)]
        self._sends.append((dst, check_expert(expert_id), rows))

    def add_recv(self, tensors: Sequence[torch.Tensor], src_rank: int, expert_id: int) -> None:
        self._check_open("add_recv")
        src = check_rank(src_rank, "src_rank", self.world_size)
        self._recvs.append((src, check_expert(expert_id), self._rows(tensors, True)))

    def execute(self, old_indices: Any = None) -> None:
        self._check_open("execute")
        sends = sorted(self._sends, key=lambda s: (s[0], s[1]))
        recvs = sorted(self._recvs, key=lambda r: (r[0], r[1]))
        self._sends, self._recvs = [], []
        ops: list[dist.P2POp] = []
        local: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        send_by_key = {(d, e): ts for d, e, ts in sends if d == self.rank}
        for src, e, ts in recvs:
            if src == self.rank:  # same process: a torch copy, not a message
                local.append((ts, send_by_key.get((self.rank, e), [])))
        for dst, _e, ts in sends:
            if dst != self.rank:
                ops.extend(dist.P2POp(dist.isend, t, self._peer(dst), self.group) for t in ts)
        for src, _e, ts in recvs:
            if src != self.rank:
                ops.extend(dist.P2POp(dist.irecv, t, self._peer(src), self.group) for t in ts)
        with stream_context(self._stream):
            for dst_ts, src_ts in local:
                for d, s in zip(dst_ts, src_ts):
                    d.copy_(s)
            if ops:
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
