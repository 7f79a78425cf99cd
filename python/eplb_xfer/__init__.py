"""eplb-xfer: move MoE expert weights between EP ranks during EPLB rebalancing.

Zero staging memory (NIXL zero-copy READ), microsecond planning in Rust, and
per-layer deadlines instead of hangs. See README.md for the tour.
"""

from __future__ import annotations

from ._core import NixlUnavailable, __version__
from .communicator import EplbCommunicator, create_communicator
from .errors import TransferError
from .nixl import NixlCommunicator
from .placement import log2phy_logcnt, rebalance_experts
from .planning import TransferPlan, plan_rebalance
from .rebalance import RebalanceStats, rearrange_expert_weights_inplace
from .torch_dist import TorchCommunicator

__all__ = [
    "EplbCommunicator",
    "NixlCommunicator",
    "NixlUnavailable",
    "RebalanceStats",
    "TorchCommunicator",
    "TransferError",
    "TransferPlan",
    "__version__",
    "create_communicator",
    "log2phy_logcnt",
    "plan_rebalance",
    "rearrange_expert_weights_inplace",
    "rebalance_experts",
]
