"""Exceptions raised by eplb-xfer."""

from __future__ import annotations

from typing import Any


class TransferError(RuntimeError):
    """A peer failed or timed out while a layer was being transferred.

    Raised on every surviving rank before the deadline. Layers listed in
    ``committed_layers`` were fully applied on this rank; no other layer was
    changed (the failed layer's rows are untouched). Commit is decided per rank:
    a rank that already had every peer's DONE for the failing layer committed
    it, so ``committed_layers`` may differ by one layer across ranks. After a
    TransferError, close the communicator and build a new one.

    Attributes:
        peer: rank whose part was missing or failed.
        layer: index of the layer that could not be committed.
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
