"""Exceptions raised by eplb-xfer."""

from __future__ import annotations

from typing import Any


class TransferError(RuntimeError):
    """A peer failed, stalled, disagreed or was interrupted while a layer moved.

    Every surviving rank raises it for the same failure, within about
    ``timeout_s`` plus the agreement's grace (one or two rounds of
    ``min(1 s, timeout_s / 2)``), with the same ``peer``, ``layer`` and
    ``committed_layers``. Layers in ``committed_layers`` were fully applied on
    every surviving rank; no other layer changed anywhere. The communicator
    refuses further work (``RuntimeError``); build a new one on a group
    without the failed rank.

    Attributes:
        peer: the rank named as the cause (the lowest rank that stopped
            answering; else the rank a verdict names: corrupt data, an
            interrupt, a local error; else the rank that disagrees on the
            placement; else the one everyone waited for).
        layer: the layer that could not be committed; ``num_layers`` when
            every layer was committed but a peer failed in the closing
            handshake; -1 when set-up failed.
        committed_layers: layers committed by this call, ascending.
        blame: short reason: ``dead``, ``checksum``, ``interrupted``,
            ``closed``, ``failed``, ``disagreement``, ``absent``, ``stalled``,
            ``transport`` or ``setup``.
    """

    def __init__(
        self,
        message: str,
        *,
        peer: int,
        layer: int,
        committed_layers: list[int] | None = None,
        blame: str = "",
    ) -> None:
        super().__init__(message)
        self.peer = peer
        self.layer = layer
        self.committed_layers: list[int] = list(committed_layers or [])
        self.blame = blame

    def __reduce__(self) -> tuple[Any, tuple[str, int, int, list[int], str]]:
        # keep attributes across pickling (multiprocessing)
        return (_rebuild, (str(self), self.peer, self.layer, self.committed_layers, self.blame))


def _rebuild(
    message: str, peer: int, layer: int, committed: list[int], blame: str
) -> TransferError:
    return TransferError(message, peer=peer, layer=layer, committed_layers=committed, blame=blame)


class TransferInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a rebalance, after the ranks agreed on its outcome.

    A ``KeyboardInterrupt``, so code that catches ``Exception`` does not
    swallow it. The other ranks raise :class:`TransferError` naming this rank
    (``blame == "interrupted"``) with the same ``committed_layers``: a layer
    every rank had finished is committed here too before this is raised, any
    other layer is left untouched everywhere.
    """

    def __init__(self, message: str, *, layer: int, committed_layers: list[int]) -> None:
        super().__init__(message)
        self.layer = layer
        self.committed_layers = list(committed_layers)


__all__ = ["TransferError", "TransferInterrupted"]
