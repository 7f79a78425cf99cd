"""EPLB placement policies: per-layer expert loads -> ``phy2log``.

The work is in Rust (``rust/src/policy/``, parallel over layers, GIL released);
this module only converts tensors and checks types and shapes.

* :func:`rebalance_experts` -- migration-aware: with an old placement it keeps
  experts where they are unless balance needs them moved; without one it is
  DeepSeek's EPLB algorithm. The signature of vLLM's
  ``AbstractEplbPolicy.rebalance_experts``.
* :func:`stock_rebalance_experts` -- DeepSeek's EPLB algorithm, ignoring where
  experts are now (the baseline).
* :func:`relabel_experts` -- the stock placement with nodes and ranks renamed to
  overlap the old one (same balance, fewer experts moved).
* :func:`log2phy_logcnt` -- ``log2phy`` and ``logcnt`` of a placement, in
  DeepSeek's conventions.

A rank's load is the sum over its slots of ``load(expert) / replicas(expert)``.
With an old placement, the rank loads of :func:`rebalance_experts` sorted in
descending order have every prefix sum at most the stock placement's on the
same load, times ``1 + max_imbalance``.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _core
from ._tensors import to_indices

__all__ = [
    "log2phy_logcnt",
    "rebalance_experts",
    "relabel_experts",
    "stock_rebalance_experts",
]


def rebalance_experts(
    weight: torch.Tensor | np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_global_expert_indices: torch.Tensor | np.ndarray | None = None,
    *,
    max_imbalance: float = 0.0,
) -> torch.Tensor:
    """Places ``num_replicas`` physical experts per layer on ``num_ranks`` ranks.

    Args:
        weight: ``[num_layers, num_logical_experts]`` load of every expert
            (any real dtype, any device; finite and ``>= 0``).
        num_replicas: physical slots per layer, a multiple of ``num_ranks`` and
            at least ``num_logical_experts``.
        num_groups: expert groups. Hierarchical placement (each group's replicas
            on one node, ``num_groups / num_nodes`` groups per node) when
            ``num_groups % num_nodes == 0``; else DeepSeek's global policy.
        num_nodes: nodes; in the hierarchical case ``num_ranks`` is a multiple.
        num_ranks: EP ranks; rank ``r`` owns slots ``[r*S, (r+1)*S)``,
            ``S = num_replicas // num_ranks``.
        old_global_expert_indices: optional current ``[num_layers,
            num_replicas]`` placement (integers, ``-1`` = empty slot). Without
            it the result is DeepSeek's algorithm. A map of whole ranks of
            the same size but a different count (vLLM's elastic EP) is
            aligned by rank: the first ``num_ranks`` ranks are kept, missing
            ranks held nothing.
        max_imbalance: fraction by which the sorted rank-load prefix sums may
            exceed the stock placement's (default 0: never).

    Returns:
        ``phy2log``: int64 ``[num_layers, num_replicas]`` CPU tensor, the
        logical expert of every physical slot. Every expert has a replica. The
        same input gives the same result on every rank.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: a value is unusable; the message names the argument.
    """
    return _plan(
        weight,
        num_replicas,
        num_groups,
        num_nodes,
        num_ranks,
        old_global_expert_indices,
        method="migrate",
        max_imbalance=max_imbalance,
    )


def stock_rebalance_experts(
    weight: torch.Tensor | np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
) -> torch.Tensor:
    """DeepSeek's EPLB algorithm (``phy2log`` only); arguments as
    :func:`rebalance_experts`."""
    return _plan(weight, num_replicas, num_groups, num_nodes, num_ranks, None, method="stock")


def relabel_experts(
    weight: torch.Tensor | np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_global_expert_indices: torch.Tensor | np.ndarray,
) -> torch.Tensor:
    """The stock placement with its nodes, and its ranks inside each node,
    renamed to overlap ``old_global_expert_indices`` as much as possible (an
    exact assignment). Every rank load is stock's; arguments as
    :func:`rebalance_experts`."""
    return _plan(
        weight,
        num_replicas,
        num_groups,
        num_nodes,
        num_ranks,
        old_global_expert_indices,
        method="relabel",
    )


def log2phy_logcnt(
    phy2log: torch.Tensor | np.ndarray, num_logical_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log2phy, logcnt)`` of a placement, in DeepSeek's conventions.

    Args:
        phy2log: integer ``[num_layers, num_slots]`` placement (``-1`` = empty
            slot, ignored).
        num_logical_experts: logical experts per layer.

    Returns:
        ``log2phy``: int64 ``[num_layers, num_logical_experts, X]``, the slots of
        each expert's replicas in slot order, ``-1`` past its count, ``X`` the
        largest count in any layer; ``logcnt``: int64 ``[num_layers,
        num_logical_experts]``, the replica count of each expert.
    """
    p = to_indices(phy2log, "phy2log")
    experts = _int("num_logical_experts", num_logical_experts)
    layers, slots = p.shape
    l2p, width, cnt = _core.log2phy_logcnt_bytes(p.tobytes(), layers, slots, experts)
    log2phy = np.frombuffer(l2p, dtype="<i8").reshape(layers, experts, width)
    logcnt = np.frombuffer(cnt, dtype="<i8").reshape(layers, experts)
    return torch.from_numpy(log2phy.copy()), torch.from_numpy(logcnt.copy())


def _plan(
    weight: object,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old: object,
    *,
    method: str,
    max_imbalance: float = 0.0,
    threads: int = 0,
) -> torch.Tensor:
    """Converts and calls the Rust policy; ``threads=0`` uses every core (the
    result does not depend on it)."""
    w = _loads(weight)
    layers, experts = w.shape
    replicas = _int("num_replicas", num_replicas)
    groups = _int("num_groups", num_groups)
    nodes = _int("num_nodes", num_nodes)
    ranks = _int("num_ranks", num_ranks)
    if isinstance(max_imbalance, bool) or not isinstance(max_imbalance, (int, float)):
        raise TypeError(f"max_imbalance: expected a float, got {type(max_imbalance).__name__}")
    old_bytes = None
    if old is not None:
        old_bytes = _old_rows(to_indices(old, "old_global_expert_indices"), layers, replicas, ranks)
    out = _core.rebalance_experts_bytes(
        w.tobytes(),
        layers,
        experts,
        replicas,
        groups,
        nodes,
        ranks,
        old=old_bytes,
        method=method,
        max_imbalance=float(max_imbalance),
        threads=threads,
    )
    return torch.from_numpy(np.frombuffer(out, dtype="<i8").reshape(layers, replicas).copy())


def _old_rows(old: np.ndarray, layers: int, replicas: int, ranks: int) -> bytes:
    """The old placement as ``[layers, replicas]`` bytes, rank blocks aligned.

    vLLM's elastic EP passes a wider map on scale-down (the first ``ranks``
    ranks survive) and a narrower one may precede a scale-up (new ranks hold
    nothing): with the same slots per rank, surviving ranks keep their blocks
    and new ranks get empty ones (``-1``).
    """
    width = old.shape[1]
    per_rank = replicas // ranks if ranks > 0 else 0
    if old.shape[0] != layers or (width != replicas and (per_rank == 0 or width % per_rank != 0)):
        raise ValueError(
            f"old_global_expert_indices: shape {tuple(old.shape)}, expected "
            f"[num_layers {layers}, num_replicas {replicas}] (or whole ranks of "
            f"{per_rank} slots)"
        )
    if width > replicas:
        old = old[:, :replicas]
    elif width < replicas:
        old = np.concatenate([old, np.full((layers, replicas - width), -1, np.int64)], axis=1)
    return np.ascontiguousarray(old, dtype="<i8").tobytes()


def _int(name: str, value: object) -> int:
    """An int argument (a Python or numpy integer, not a bool)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return int(value)


def _loads(weight: object) -> np.ndarray:
    """``weight`` as contiguous float64 ``[num_layers, num_logical_experts]``."""
    if isinstance(weight, torch.Tensor):
        if weight.dtype == torch.bool or weight.is_complex():
            raise TypeError(f"weight: expected real loads, got dtype {weight.dtype}")
        arr = weight.detach().to(device="cpu", dtype=torch.float64).numpy()
    elif isinstance(weight, np.ndarray):
        if weight.dtype.kind not in "iuf":
            raise TypeError(f"weight: expected real loads, got dtype {weight.dtype}")
        arr = weight
    else:
        raise TypeError(
            f"weight: expected a torch.Tensor or numpy.ndarray, got {type(weight).__name__}"
        )
    if arr.ndim != 2:
        raise ValueError(
            f"weight: expected shape [num_layers, num_logical_experts], got {tuple(arr.shape)}"
        )
    return np.ascontiguousarray(arr, dtype="<f8")


class VllmPolicy:
    """vLLM's EPLB policy interface (``AbstractEplbPolicy``) over
    :func:`rebalance_experts`: vLLM calls the classmethod with the current
    ``phy2log`` as the sixth argument and takes back ``phy2log``."""

    @classmethod
    def rebalance_experts(
        cls,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return rebalance_experts(
            weight, num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices
        )


def register_vllm_policy() -> bool:
    """Makes vLLM's EPLB policy ``"default"`` (the only name its config
    accepts) this migration-aware policy; called by the vLLM plugin. Returns
    whether vLLM's policy table was found."""
    import importlib

    try:
        mod = importlib.import_module("vllm.distributed.eplb.policy")
    except ImportError:
        return False
    table = getattr(mod, "EPLB_POLICIES", None)
    if not isinstance(table, dict):
        return False
    base: type = object
    if _has("vllm.distributed.eplb.policy.abstract"):
        abstract = importlib.import_module("vllm.distributed.eplb.policy.abstract")
        base = getattr(abstract, "AbstractEplbPolicy", object)
    policy = type("EplbXferPolicy", (VllmPolicy, base), {})
    table["default"] = policy
    return True


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
