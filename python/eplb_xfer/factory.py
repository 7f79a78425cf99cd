"""``create_communicator``: a communicator by backend name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .communicator import EplbCommunicator
from .nixl import NixlCommunicator
from .torch_dist import TorchCommunicator

BACKENDS = ("nixl", "torch")


def create_communicator(
    backend: str,
    group: dist.ProcessGroup | None,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    expert_buffer: Sequence[torch.Tensor],
    **options: Any,
) -> EplbCommunicator:
    """Builds a communicator by name (on every rank of ``group``).

    Args:
        backend: ``"nixl"`` (options: ``mode``, ``timeout_s``, ``verify``,
            ``direction``, ``schedule``, ``node_of_rank``, ``lib_path``; see
            :class:`NixlCommunicator`) or ``"torch"`` (torch.distributed P2P:
            gloo on CPU, NCCL on GPU; option: ``node_of_rank``).
    """
    if backend == "nixl":
        return NixlCommunicator(group, expert_weights, expert_buffer, **options)
    if backend == "torch":
        unknown = sorted(set(options) - {"node_of_rank"})
        if unknown:
            raise TypeError(f"options: the torch backend takes only node_of_rank, got {unknown}")
        return TorchCommunicator(group, expert_weights, expert_buffer, **options)
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
