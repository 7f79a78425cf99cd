"""Exceptions raised by eplb-xfer."""

from __future__ import annotations

from typing import Any


class TransferError(RuntimeError):
    """A peer failed or timed out while a layer was being transferred.

    With a NixlCommunicator it is raised on every surviving rank within about
    ``timeout_s`` plus 2 s, with the same ``peer``, ``layer`` and
    ``committed_layers`` everywhere: survivors settle, before raising, whether
    the failing layer completed on every rank (then all commit it and fail at
    the next one). Layers in ``committed_layers`` were fully applied; no other
    layer was changed. The communicator refuses further work (``RuntimeError``);
    close it and build a new one on a group without the failed rank.

    Attributes:
        peer: rank whose part was missing or failed.
        layer: index of the layer that could not be committed; ``num_layers``
            when every layer was committed but a peer failed in the closing
            handshake; -1 when a NixlCommunicator's set-up failed.
        committed_layers: layers committed on this rank by this call, ascending.
    """

    def __init__(
        self, message: str, *, peer: int, layer: int, committed_layers: list[int] | None = None
    ) -> None:
        super().__init__(message)
        self.peer = peer
        self.layer = layer
        self.committed_layers: list[int] = list(committed_layers or [])

    def __reduce__(self) -> tuple[Any, tuple[str, int, int, list[int]]]:
        # keep attributes across pickling (multiprocessing)
        return (_rebuild, (str(self), self.peer, self.layer, self.committed_layers))


def _rebuild(message: str, peer: int, layer: int, committed: list[int]) -> TransferError:
    return TransferError(message, peer=peer, layer=layer, committed_layers=committed)
