"""torch.distributed P2P communicator: the baseline (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .communicator import EplbCommunicator, check_expert, check_rank


class TorchCommunicator(EplbCommunicator):
    """Sends and receives expert rows with ``batch_isend_irecv``.

    Messages between a pair of ranks are ordered by expert id on both sides, so
    sender and receiver agree without any extra handshake. A baseline: a dead
    peer makes it wait for torch.distributed's own timeout (gloo/NCCL), and it
    has no ``verify`` option.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(group)
        self._sends: list[tuple[int, int, list[torch.Tensor]]] = []
        self._recvs: list[tuple[int, int, list[torch.Tensor]]] = []

    def _peer(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def add_send(self, tensors: Sequence[torch.Tensor], dst_rank: int, expert_id: int) -> None:
        self._check_open("add_send")
        dst = check_rank(dst_rank, "dst_rank", self.world_size)
        self._sends.append((dst, check_expert(expert_id), _contiguous(tensors, "tensors")))

    def add_recv(self, tensors: Sequence[torch.Tensor], src_rank: int, expert_id: int) -> None:
        self._check_open("add_recv")
        src = check_rank(src_rank, "src_rank", self.world_size)
        ts = list(tensors)
        for i, t in enumerate(ts):
            if not isinstance(t, torch.Tensor) or not t.is_contiguous():
                raise ValueError(f"tensors[{i}]: receive targets must be contiguous tensors")
        self._recvs.append((src, check_expert(expert_id), ts))

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
        for dst_ts, src_ts in local:
            for d, s in zip(dst_ts, src_ts):
                d.copy_(s)
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()


def _contiguous(tensors: Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    out = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        out.append(t if t.is_contiguous() else t.contiguous())
    return out
