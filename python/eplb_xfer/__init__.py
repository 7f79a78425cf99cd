"""eplb-xfer: move MoE expert weights between EP ranks during EPLB rebalancing.

Zero staging memory (NIXL zero-copy), a plan computed once in Rust, and per
layer a deadline and a failure agreement instead of hangs. See README.md.
"""

from __future__ import annotations

from ._core import NixlUnavailable, __version__
from .communicator import EplbCommunicator
from .errors import TransferError, TransferInterrupted
from .factory import create_communicator
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
    "TransferInterrupted",
    "TransferPlan",
    "__version__",
    "create_communicator",
    "log2phy_logcnt",
    "plan_rebalance",
    "rearrange_expert_weights_inplace",
    "rebalance_experts",
]
