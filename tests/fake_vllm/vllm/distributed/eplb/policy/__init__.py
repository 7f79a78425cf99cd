"""Stand-in: vLLM's policy table (name -> class)."""

import torch

from .abstract import AbstractEplbPolicy


class DefaultEplbPolicy(AbstractEplbPolicy):
    """A load-driven placement that ignores the current one, like vLLM's
    default: the heaviest experts get the redundant slots, then slots are
    dealt out in descending load order. Not DeepSeek's algorithm."""

    @classmethod
    def rebalance_experts(cls, weight, num_replicas, num_groups, num_nodes, num_ranks, old=None):
        weight = torch.as_tensor(weight, dtype=torch.float64)
        num_layers, num_logical = weight.shape
        out = torch.empty(num_layers, num_replicas, dtype=torch.int64)
        for layer in range(num_layers):
            order = torch.argsort(weight[layer], descending=True, stable=True)
            extra = order[: num_replicas - num_logical]
            out[layer] = torch.cat([order, extra])
        return out


EPLB_POLICIES = {"default": DefaultEplbPolicy}
