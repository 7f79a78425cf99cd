"""``eplb-xfer demo``: a verified rebalance on N local CPU ranks.

Spawns ``ranks`` processes (gloo group), gives each a scaled-down copy of a
real model's expert layers, rebalances ``repeat`` times to fresh random
placements through one communicator, checks every slot byte for byte and
reports per-rank statistics.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import numpy as np

from .models import get_model, scaled

BACKENDS = ("nixl", "torch")
MODES = ("zero_copy", "staged")
#: ``--policy``: stock = DeepSeek's EPLB, ours = migration-aware (eplb_xfer.rebalance_experts).
POLICIES = ("stock", "ours")
#: With ``--policy``: per-expert loads drift by exp(POLICY_DRIFT * N(0, 1)) per rebalance.
POLICY_DRIFT = 0.15

#: Environment of the spawned ranks (values the user already set win).
RANK_ENV = {"UCX_WARN_UNUSED_ENV_VARS": "n"}

#: Mismatch messages kept per rank and rebalance (the count is always exact).
MAX_ERRORS_KEPT = 5


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. ``experts=None`` means ``4 * ranks``.

    Each rank owns ``ceil(experts / ranks) + 1`` slots, so the placement has
    about one redundant replica per rank; ``empty_slots`` of those slots per
    layer are ``-1`` (empty) instead.
    """

    model: str = "deepseek-v3"
    scale: int = 16
    ranks: int = 4
    layers: int = 4
    experts: int | None = None
    empty_slots: int = 0
    backend: str = "nixl"
    mode: str = "zero_copy"
    timeout_s: float = 60.0
    seed: int = 0
    repeat: int = 1
    progress: bool = True
    policy: str | None = None

    @property
    def num_experts(self) -> int:
        return self.experts if self.experts is not None else 4 * self.ranks

    @property
    def slots_per_rank(self) -> int:
        return math.ceil(self.num_experts / self.ranks) + 1

    @property
    def num_slots(self) -> int:
        return self.slots_per_rank * self.ranks

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first bad field."""
        get_model(self.model)
        checks: list[tuple[str, object, bool, str]] = [
            ("scale", self.scale, self.scale >= 1, "an int >= 1"),
            ("ranks", self.ranks, 2 <= self.ranks <= 64, "an int in 2..64"),
            ("layers", self.layers, self.layers >= 1, "an int >= 1"),
            ("experts", self.experts, self.num_experts >= 1, "an int >= 1"),
            ("repeat", self.repeat, self.repeat >= 1, "an int >= 1"),
            ("timeout", self.timeout_s, self.timeout_s > 0, "a positive number of seconds"),
            ("backend", self.backend, self.backend in BACKENDS, f"one of {BACKENDS}"),
            ("mode", self.mode, self.mode in MODES, f"one of {MODES}"),
            ("policy", self.policy, self.policy in (None, *POLICIES), f"one of {POLICIES}"),
        ]
        for name, value, ok, want in checks:
            if not ok:
                raise ValueError(f"{name}: expected {want}, got {value!r}")
        spare = self.num_slots - self.num_experts
        if self.policy is not None and self.empty_slots:
            raise ValueError(
                f"empty_slots: expected 0 with a placement policy (it fills every slot), "
                f"got {self.empty_slots!r}"
            )
        if not 0 <= self.empty_slots <= spare:
            raise ValueError(
                f"empty_slots: expected 0..{spare} ({self.num_slots} slots hold "
                f"{self.num_experts} experts), got {self.empty_slots!r}"
            )


def make_placements(cfg: DemoConfig) -> list[np.ndarray]:
    """``repeat + 1`` seeded random ``[layers, slots]`` placements (or, with a
    policy, :func:`policy_placements`)."""
    from ._scenario import random_placement

    if cfg.policy is not None:
        return policy_placements(cfg)
    rng = np.random.default_rng(cfg.seed)
    return [
        random_placement(rng, cfg.layers, cfg.num_experts, cfg.num_slots, cfg.empty_slots)
        for _ in range(cfg.repeat + 1)
    ]


def policy_placements(cfg: DemoConfig) -> list[np.ndarray]:
    """``repeat + 1`` placements that ``cfg.policy`` plans for seeded lognormal
    loads drifting by ``POLICY_DRIFT`` per rebalance: the first by stock, then
    stock again each time, or ours from the previous placement."""
    from . import placement

    rng = np.random.default_rng(cfg.seed)
    load = rng.lognormal(0.0, 1.0, (cfg.layers, cfg.num_experts))
    shape = (cfg.num_slots, 1, 1, cfg.ranks)  # one group, one node: local ranks
    out = [placement.stock_rebalance_experts(load, *shape).numpy()]
    for _ in range(cfg.repeat):
        load = load * np.exp(POLICY_DRIFT * rng.standard_normal(load.shape))
        if cfg.policy == "ours":
            out.append(placement.rebalance_experts(load, *shape, out[-1]).numpy())
        else:
            out.append(placement.stock_rebalance_experts(load, *shape).numpy())
    return out


def effective_placements(placements: Sequence[np.ndarray]) -> list[np.ndarray]:
    """What each slot actually holds after each rebalance.

    A ``-1`` slot keeps its bytes, so after several rebalances it holds the
    last expert placed there (or the initial empty filler, still ``-1``).
    """
    out = [placements[0]]
    for p in placements[1:]:
        out.append(np.where(p < 0, out[-1], p))
    return out


class Progress:
    """A dependency-free progress bar on a stream.

    On a TTY it redraws one line with ``\\r``; otherwise it prints a plain
    line only when a rebalance completes, so CI logs stay readable.
    """

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = max(1, total)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0

    def update(self, done: int) -> None:
        """Shows ``done`` of ``total`` steps (TTY only)."""
        self.done = min(max(done, self.done), self.total)
        if self.tty:
            width = 30
            fill = round(width * self.done / self.total)
            bar = "#" * fill + "." * (width - fill)
            self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} layers")
            self.stream.flush()

    def note(self, text: str) -> None:
        """A milestone: a plain line without a TTY, nothing on a TTY (the bar shows it)."""
        if not self.tty:
            self.stream.write(f"{self.label}: {text}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _rank_main(
    rank: int,
    world: int,
    cfg: DemoConfig,
    placements: list[np.ndarray],
    effective: list[np.ndarray],
) -> dict[str, Any]:
    """One rank of the demo (module level: the spawn start method pickles it)."""
    import eplb_xfer
    from eplb_xfer._scenario import build_weights, verify

    specs = scaled(cfg.model, cfg.scale).specs()
    weights, buffer = build_weights(specs, placements[0], rank, world, cfg.num_experts, cfg.seed)
    options: dict[str, Any] = {}
    if cfg.backend == "nixl":
        options = {"mode": cfg.mode, "timeout_s": cfg.timeout_s}
    t0 = time.perf_counter()
    comm = eplb_xfer.create_communicator(cfg.backend, None, weights, buffer, **options)
    setup_s = time.perf_counter() - t0
    progress = (
        Progress(cfg.layers * cfg.repeat, f"rebalance ({cfg.backend})")
        if rank == 0 and cfg.progress
        else None
    )
    rebalances: list[dict[str, Any]] = []
    try:
        for k in range(cfg.repeat):
            base = k * cfg.layers

            def on_layer(layer: int, base: int = base) -> None:
                if progress is not None:
                    progress.update(base + layer + 1)

            stats = eplb_xfer.rearrange_expert_weights_inplace(
                placements[k], placements[k + 1], weights, buffer, None, comm, on_layer=on_layer
            )
            errors = verify(
                specs, weights, effective[k], placements[k + 1], rank, world, cfg.num_experts,
                cfg.seed,
            )  # fmt: skip
            entry = stats.as_dict()
            entry["mismatches"] = len(errors)
            entry["errors"] = errors[:MAX_ERRORS_KEPT]
            entry["slots_checked"] = cfg.layers * cfg.slots_per_rank
            rebalances.append(entry)
            if progress is not None:
                progress.update(base + cfg.layers)  # layers with nothing to move are not reported
                progress.note(
                    f"{k + 1}/{cfg.repeat} done, {cfg.layers} layers in {stats.seconds:.3f} s"
                )
        staging = comm.staging_bytes
    finally:
        comm.close()
        if progress is not None:
            progress.close()
    return {
        "rank": rank,
        "setup_s": setup_s,
        "staging_bytes": staging,
        "rebalances": rebalances,
    }


def summarize(per_rank: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-rank totals over all rebalances (one dict per rank)."""
    rows = []
    for r in per_rank:
        rb = r["rebalances"]
        secs = sum(x["seconds"] for x in rb)
        recv = sum(x["bytes_received"] for x in rb)
        rows.append(
            {
                "rank": r["rank"],
                "bytes_received": recv,
                "experts_received": sum(x["experts_received"] for x in rb),
                "bytes_copied_locally": sum(x["bytes_copied_locally"] for x in rb),
                "seconds": secs,
                "gbps": recv / secs / 1e9 if secs > 0 else 0.0,
                "staging_bytes": r["staging_bytes"],
                "setup_s": r["setup_s"],
                "slots_checked": sum(x["slots_checked"] for x in rb),
                "mismatches": sum(x["mismatches"] for x in rb),
            }
        )
    return rows


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f}"


def format_stats(rows: Sequence[dict[str, Any]]) -> str:
    """The per-rank summary as a text table with a totals row.

    Totals: sums, except ``seconds`` (the slowest rank, since ranks run in
    parallel) and ``GB/s`` (all bytes received over that time).
    """
    head = [
        "rank",
        "recv MiB",
        "experts",
        "local MiB",
        "seconds",
        "GB/s",
        "staging MiB",
        "setup s",
        "verified",
    ]

    def cells(r: dict[str, Any], name: str) -> list[str]:
        ok = r["slots_checked"] - min(r["mismatches"], r["slots_checked"])
        return [
            name,
            _mib(r["bytes_received"]),
            str(r["experts_received"]),
            _mib(r["bytes_copied_locally"]),
            f"{r['seconds']:.3f}",
            f"{r['gbps']:.3f}",
            _mib(r["staging_bytes"]),
            f"{r['setup_s']:.3f}",
            f"{ok}/{r['slots_checked']}",
        ]

    body = [cells(r, str(r["rank"])) for r in rows]
    secs = max((r["seconds"] for r in rows), default=0.0)
    recv = sum(r["bytes_received"] for r in rows)
    total = {
        "bytes_received": recv,
        "experts_received": sum(r["experts_received"] for r in rows),
        "bytes_copied_locally": sum(r["bytes_copied_locally"] for r in rows),
        "seconds": secs,
        "gbps": recv / secs / 1e9 if secs > 0 else 0.0,
        "staging_bytes": sum(r["staging_bytes"] for r in rows),
        "setup_s": max((r["setup_s"] for r in rows), default=0.0),
        "slots_checked": sum(r["slots_checked"] for r in rows),
        "mismatches": sum(r["mismatches"] for r in rows),
    }
    foot = cells(total, "total")
    widths = [max(len(x[i]) for x in [head, *body, foot]) for i in range(len(head))]

    def line(cs: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cs, widths))

    rule = line(["-" * w for w in widths])
    return "\n".join([line(head), rule, *(line(b) for b in body), rule, line(foot)])


def run_demo(cfg: DemoConfig, out: TextIO | None = None) -> dict[str, Any]:
    """Runs the demo, prints the report to ``out`` and returns the results.

    The result has ``ok`` (every slot verified on every rank), ``config``,
    ``summary`` (per-rank totals), ``ranks`` (per-rank, per-rebalance stats)
    and, on a rank failure, ``error``.
    """
    from ._spawn import RankFailed, spawn_ranks

    cfg.validate()
    out = out if out is not None else sys.stdout
    model = scaled(cfg.model, cfg.scale)
    placements = make_placements(cfg)
    effective = effective_placements(placements)
    mode = f", mode {cfg.mode}" if cfg.backend == "nixl" else ""
    shapes = ", ".join(f"{s.name} {_dtype(s.dtype)} {list(s.row_shape)}" for s in model.tensors)
    out.write(
        f"eplb-xfer demo: {model.title} scaled 1/{cfg.scale}: {shapes}\n"
        f"  {model.expert_bytes:,} B per expert; {cfg.layers} layers x {cfg.num_slots} slots "
        f"({cfg.ranks} ranks x {cfg.slots_per_rank}), {cfg.num_experts} experts, "
        f"{cfg.empty_slots} empty slots per layer; backend {cfg.backend}{mode}; "
        f"{cfg.repeat} rebalance(s), seed {cfg.seed}\n"
    )
    if cfg.policy is not None:
        out.write(
            f"  placements by policy {cfg.policy} on lognormal loads drifting "
            f"{POLICY_DRIFT:.0%} per rebalance\n"
        )
    out.flush()
    env = {k: os.environ.get(k, v) for k, v in RANK_ENV.items()}
    result: dict[str, Any] = {"config": asdict(cfg) | {"num_experts": cfg.num_experts}}
    try:
        per_rank = spawn_ranks(
            _rank_main,
            cfg.ranks,
            cfg,
            placements,
            effective,
            timeout_s=120.0 + 2 * cfg.timeout_s * cfg.repeat,
            env=env,
        )
    except RankFailed as e:
        out.write(f"FAILED: a rank raised:\n{e}\n")
        result.update(ok=False, error=str(e))
        return result
    summary = summarize(per_rank)
    out.write(format_stats(summary) + "\n")
    bad = [x for r in per_rank for x in r["rebalances"] if x["mismatches"]]
    for x in bad:
        for msg in x["errors"]:
            out.write(f"  mismatch: {msg}\n")
    ok = not bad
    checked = sum(r["slots_checked"] for r in summary)
    out.write(
        f"OK: all {checked} slot checks byte-exact\n"
        if ok
        else f"FAILED: {sum(r['mismatches'] for r in summary)} mismatching rows\n"
    )
    result.update(ok=ok, summary=summary, ranks=per_rank)
    if cfg.policy is not None:
        moved = per_rebalance(per_rank)
        full = get_model(cfg.model).expert_bytes
        for k, m in enumerate(moved):
            out.write(
                f"policy {cfg.policy}: rebalance {k + 1}: {m['experts_received']} experts "
                f"received, {_mib(m['bytes_received'])} MiB here "
                f"({m['experts_received'] * full / 1e9:.2f} GB at full {cfg.model} size)\n"
            )
        result["per_rebalance"] = moved
    return result


def per_rebalance(per_rank: Sequence[dict[str, Any]]) -> list[dict[str, int]]:
    """Experts and bytes received by all ranks together, per rebalance."""
    count = min((len(r["rebalances"]) for r in per_rank), default=0)
    return [
        {
            "experts_received": sum(r["rebalances"][k]["experts_received"] for r in per_rank),
            "bytes_received": sum(r["rebalances"][k]["bytes_received"] for r in per_rank),
        }
        for k in range(count)
    ]


def _dtype(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def write_json(result: dict[str, Any], path: str) -> None:
    """Writes ``result`` as JSON to ``path`` (``-`` = stdout)."""
    text = json.dumps(result, indent=2, default=_jsonable)
    if path == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def _jsonable(x: object) -> object:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return str(x)
