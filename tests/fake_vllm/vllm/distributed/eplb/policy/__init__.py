"""Stand-in: vLLM's policy table (name -> class)."""

from .abstract import AbstractEplbPolicy


class DefaultEplbPolicy(AbstractEplbPolicy):
    @classmethod
    def rebalance_experts(cls, weight, num_replicas, num_groups, num_nodes, num_ranks, old=None):
        raise NotImplementedError("stand-in")


EPLB_POLICIES = {"default": DefaultEplbPolicy}
