"""vLLM plugin: vLLM's EPLB moves expert weights with eplb-xfer.

Installed as the ``vllm.general_plugins`` entry point ``eplb_xfer``
(``pyproject.toml``); vLLM calls :func:`register` in every process before
the model loads. It does nothing when vLLM is not installed, and nothing
imports this module except vLLM's plugin loader (``import eplb_xfer`` never
imports vllm).

What it changes: vLLM picks its EPLB communicator by name with
``--eplb-config.communicator`` (``EPLBConfig.communicator``, a validated
``Literal["torch_nccl", "torch_gloo", "nixl", "pynccl"]``, so no new name can
be added without editing vLLM). The plugin takes over ``"nixl"``, which is
also what vLLM chooses by default when NIXL is installed: every binding of
vLLM's ``create_eplb_communicator`` is wrapped so that ``"nixl"`` returns
eplb-xfer's NIXL communicator and every other name goes to vLLM's own. To
keep vLLM's NIXL backend, leave ``eplb_xfer`` out of ``VLLM_PLUGINS``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import Any

import torch

from .placement import register_vllm_policy

log = logging.getLogger("eplb_xfer.vllm")

#: Modules that hold a binding of vLLM's factory (imported by name there).
FACTORY_MODULES = (
    "vllm.distributed.eplb.eplb_communicator",
    "vllm.distributed.eplb.eplb_state",
    "vllm.distributed.elastic_ep.elastic_execute",
)
FACTORY = "create_eplb_communicator"
#: The backend name taken over.
BACKEND = "nixl"


class VllmNixlCommunicator:
    """The communicator vLLM gets for ``"nixl"``: eplb-xfer's
    :class:`~eplb_xfer.NixlCommunicator` on the coordinator's CPU (gloo)
    group, set up at the first transfer call.

    Set-up is deferred because under elastic EP vLLM builds communicators on
    different ranks at different moments; the first ``set_transfer_context``
    (or ``execute``) happens on every rank of a rebalance together.
    """

    def __init__(
        self,
        group_coordinator: Any,
        expert_weights: Sequence[Sequence[torch.Tensor]],
        expert_buffer: Sequence[torch.Tensor],
        **options: Any,
    ) -> None:
        self._coordinator = group_coordinator
        self._weights = [list(layer) for layer in expert_weights]
        self._buffer = list(expert_buffer)
        self._options = options
        self._stream: Any = None
        self._comm: Any = None

    def _get(self) -> Any:
        if self._comm is None:
            from .nixl import NixlCommunicator

            group = getattr(self._coordinator, "cpu_group", None)
            self._comm = NixlCommunicator(group, self._weights, self._buffer, **self._options)
            self._comm.set_stream(self._stream)
        return self._comm

    @property
    def needs_profile_buffer_reservation(self) -> bool:
        """False: nothing is allocated at transfer time (zero-copy)."""
        return bool(self._options.get("mode", "zero_copy") != "zero_copy")

    def set_stream(self, stream: Any) -> None:
        self._stream = stream
        if self._comm is not None:
            self._comm.set_stream(stream)

    def set_transfer_context(self, old_indices: Any, layer_idx: int, **kw: Any) -> None:
        self._get().set_transfer_context(old_indices, layer_idx, **kw)

    def add_send(self, tensors: Sequence[torch.Tensor], dst_rank: int, expert_id: int) -> None:
        self._get().add_send(tensors, dst_rank, expert_id)

    def add_recv(self, tensors: Sequence[torch.Tensor], src_rank: int, expert_id: int) -> None:
        self._get().add_recv(tensors, src_rank, expert_id)

    def execute(self, old_indices: Any = None) -> None:
        self._get().execute(old_indices)

    @property
    def staging_bytes(self) -> int:
        return 0 if self._comm is None else int(self._comm.staging_bytes)

    def close(self) -> None:
        if self._comm is not None:
            self._comm.close()


def _wrap(original: Any) -> Any:
    def create_eplb_communicator(
        group_coordinator: Any,
        backend: str,
        expert_weights: Sequence[Sequence[torch.Tensor]],
        expert_buffer: Sequence[torch.Tensor],
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if backend == BACKEND and not args and not kwargs:
            return VllmNixlCommunicator(group_coordinator, expert_weights, expert_buffer)
        return original(group_coordinator, backend, expert_weights, expert_buffer, *args, **kwargs)

    create_eplb_communicator.__wrapped__ = original  # type: ignore[attr-defined]
    create_eplb_communicator._eplb_xfer = True  # type: ignore[attr-defined]
    return create_eplb_communicator


def register() -> None:
    """vLLM's plugin hook (no arguments; idempotent; a no-op without vLLM)."""
    try:
        base = importlib.import_module(FACTORY_MODULES[0])
    except ImportError:
        return
    original = getattr(base, FACTORY, None)
    if original is None:
        log.warning("vLLM has no %s.%s; eplb-xfer not installed", FACTORY_MODULES[0], FACTORY)
        return
    if getattr(original, "_eplb_xfer", False):
        return
    wrapped = _wrap(original)
    patched = []
    for name in FACTORY_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(mod, FACTORY, None) is original:
            setattr(mod, FACTORY, wrapped)
            patched.append(name)
    register_vllm_policy()
    log.info("eplb-xfer: vLLM EPLB communicator %r now uses eplb-xfer (%s)", BACKEND, patched)


__all__ = ["BACKEND", "FACTORY_MODULES", "VllmNixlCommunicator", "register"]
