"""Per-rank memory that a rebalance needs, for each communicator design.

Every number is a multiple of ``L``, the bytes of one layer's worth of local
expert rows on one rank::

    num_physical = num_experts + redundancy     (default redundancy: one slot per rank)
    n_local      = ceil(num_physical / ep)
    L            = n_local * expert_bytes       (expert_bytes from eplb_xfer.models)

All designs land received experts in vLLM's ``expert_buffer`` (one layer,
``L``) which the driver holds anyway; every column counts it, so the columns
compare the total transfer-path memory per rank:

============== ================ ========================================================
design         bytes            what
============== ================ ========================================================
v1 NIXL        (2 * ep + 1) L   per-destination send and receive buffers of ep x layer
                                each (CONTEXT.md), plus the expert_buffer
v2 packed      3 L              one packed send layer (PR #40013) plus a receive buffer
                                assumed to be one layer, plus the expert_buffer
v3 zero-copy   L                READ straight from peers' weights into the expert_buffer
ours zero-copy L                same, ``staging_bytes == 0``
ours staged    2 L              the expert_buffer plus one packed send layer
                                (``NixlCommunicator(mode="staged").staging_bytes``)
============== ================ ========================================================

Cross-check: PR #40013 reports DeepSeek-V3.2 EP=8 at about 4.4 GiB for v2;
``memory_table(["deepseek-v3"], [8], redundancy=32)`` (288 physical experts,
as DeepSeek deploys) gives 3 L = 4.43 GiB.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .models import MODELS, get_model

GIB = 1 << 30

#: Design keys in table order, with their column titles.
DESIGNS: dict[str, str] = {
    "v1_nixl": "v1 NIXL",
    "v2_packed": "v2 packed",
    "v3_zero_copy": "v3 zero-copy",
    "ours_zero_copy": "ours zero-copy",
    "ours_staged": "ours staged",
}

DEFAULT_EPS: tuple[int, ...] = (8, 16, 32, 64)


def design_bytes(ep: int, layer_bytes: int) -> dict[str, int]:
    """Bytes per rank of each design for one EP size and one local layer ``L``."""
    return {
        "v1_nixl": (2 * ep + 1) * layer_bytes,
        "v2_packed": 3 * layer_bytes,
        "v3_zero_copy": layer_bytes,
        "ours_zero_copy": layer_bytes,
        "ours_staged": 2 * layer_bytes,
    }


def memory_table(
    models: Sequence[str] | None = None,
    eps: Sequence[int] | None = None,
    redundancy: int | None = None,
) -> list[dict[str, Any]]:
    """One row per (model, ep): geometry and per-design bytes per rank.

    Args:
        models: model names (default: every model in :data:`eplb_xfer.models.MODELS`).
        eps: expert-parallel sizes (default: 8, 16, 32, 64).
        redundancy: redundant physical experts in total (default: ``ep``,
            one redundant slot per rank).

    Each row holds ``model``, ``ep``, ``redundancy``, ``num_physical``,
    ``n_local``, ``expert_bytes``, ``layer_bytes`` and one byte count per key
    of :data:`DESIGNS`.

    >>> row = memory_table(["qwen3-30b-a3b"], [8])[0]
    >>> row["n_local"], row["ours_zero_copy"] == row["layer_bytes"], row["ours_staged"] // GIB
    (17, True, 0)
    """
    rows: list[dict[str, Any]] = []
    for name in models if models is not None else list(MODELS):
        m = get_model(name)
        eb = m.expert_bytes
        for ep in eps if eps is not None else DEFAULT_EPS:
            if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
                raise ValueError(f"eps: expected positive ints, got {ep!r}")
            red = ep if redundancy is None else redundancy
            if isinstance(red, bool) or not isinstance(red, int) or red < 0:
                raise ValueError(f"redundancy: expected an int >= 0, got {red!r}")
            num_physical = m.num_experts + red
            n_local = math.ceil(num_physical / ep)
            layer = m.layer_bytes(n_local)
            rows.append(
                {
                    "model": m.name,
                    "ep": ep,
                    "redundancy": red,
                    "num_physical": num_physical,
                    "n_local": n_local,
                    "expert_bytes": eb,
                    "layer_bytes": layer,
                    **design_bytes(ep, layer),
                }
            )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table, sizes in GiB with 2 decimals."""
    head = ["model", "ep", "slots/rank", "1 layer L", *DESIGNS.values()]
    body = [
        [
            str(r["model"]),
            str(r["ep"]),
            str(r["n_local"]),
            *(f"{int(r[k]) / GIB:.2f}" for k in ("layer_bytes", *DESIGNS)),
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    out = [line(head), line(["-" * w for w in widths])]
    prev = None
    for r, cells in zip(rows, body):
        if prev is not None and r["model"] != prev:
            out.append("")
        prev = r["model"]
        out.append(line(cells))
    return "\n".join(out)


LEGEND = """\
GiB per rank for the transfer path, including vLLM's one-layer expert_buffer (L) in every design.
  v1 NIXL        = (2*ep + 1) L: per-destination send + receive buffers, ep x layer each
  v2 packed      = 3 L: one packed send layer + a one-layer receive buffer (assumed)
  v3 zero-copy   = L: READ from peers' weights straight into the expert_buffer
  ours zero-copy = L: same, 0 staging bytes
  ours staged    = 2 L: the expert_buffer + one packed send layer"""
