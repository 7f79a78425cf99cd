"""Emulated 2-host rebalance benchmark: NIXL vs torch (gloo), unshaped and with the link shaped.

Two emulated hosts x two ranks on this machine (``tests/emulated_hosts.py``:
a network namespace per host joined by a veth pair, a PID/IPC/UTS namespace
per host, so UCX uses ``cma`` inside a host and ``tcp`` across; gloo also runs
over the veth). Each rank holds a scaled-down DeepSeek-V3 expert layout (uint8
w13, fp32 s13, uint8 w2, fp32 s2) filled from the byte oracle of
``tests/hosts_workers.py`` (seeded random bytes per layer, tensor and expert).
Every backend rebalances the same ``old -> new`` placement (planned with
``node_of_rank = [0, 0, 1, 1]``, so
same-host sources are preferred for every backend) ``warmup + repeats`` times,
the weights restored in between; the slowest rank's seconds of each repeat
count, the median is reported. Then the veth is limited with ``tc qdisc ...
tbf rate RATE`` on both hosts' egress (netem is not in this kernel) and every
backend runs again.

Per row: rebalance seconds, bytes that crossed hosts (from the plan, per
direction, and as counted on the wire: interface tx bytes, with gloo barriers
and the headers the kernel counts (one per GSO super-packet)), the link-time
lower bound (the busier direction's plan bytes / link rate; tbf shapes each
direction separately) and the ratio to it, and the same for a layer-by-layer
bound (the sum over layers of each layer's busier direction: what a transfer
that finishes one layer before starting the next cannot beat). Every result is
checked byte for byte once per row.

NIXL rows: ``direction=auto|read|write`` when this eplb_xfer's communicator
accepts a ``direction`` option; otherwise one row with its default (READ) and a
note. Writes ``benches/results/hosts.json``. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benches" / "results"
sys.path.insert(0, str(ROOT / "tests"))  # the emulated-hosts harness lives with the tests

import emulated_hosts  # noqa: E402
from emulated_hosts import IFACE, Action, EmulatedHosts  # noqa: E402

#: NIXL transfer directions the issue asks for (when the communicator has the option).
DIRECTIONS = ("auto", "read", "write")
QUIET_UCX = {"UCX_WARN_UNUSED_ENV_VARS": "n", "UCX_LOG_LEVEL": "fatal"}


@dataclass(frozen=True)
class Row:
    """One backend configuration: ``create_communicator(backend, ..., **options)``."""

    name: str
    backend: str
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Config:
    hosts: int = 2
    ranks_per_host: int = 2
    layers: int = 4
    slots_per_rank: int = 8
    redundant: int = 4
    changed: float = 0.5
    scale: int = 4
    repeats: int = 5
    warmup: int = 1
    rate: str = "1gbit"
    burst: str = "256kb"
    latency: str = "50ms"
    seed: int = 0x5EEDA11
    timeout_s: float = 120.0

    @property
    def world(self) -> int:
        return self.hosts * self.ranks_per_host

    @property
    def slots(self) -> int:
        return self.world * self.slots_per_rank

    @property
    def experts(self) -> int:
        return self.slots - self.redundant

    @property
    def nodes(self) -> list[int]:
        return [r // self.ranks_per_host for r in range(self.world)]


_RATE_UNITS = {
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "bps": 8.0,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
    "tbps": 8e12,
}


def model_specs(scale: int) -> list[tuple[str, Any, tuple[int, ...]]]:
    """(name, dtype, row shape) of DeepSeek-V3's expert tensors, dims / ``scale``."""
    from eplb_xfer.models import scaled

    return [(s.name, s.dtype, tuple(s.row_shape)) for s in scaled("deepseek-v3", scale).specs()]


def build_info() -> dict[str, Any]:
    """Which eplb_xfer was measured: version, where it was installed from, and a
    digest of the extension (the package may be rebuilt between runs)."""
    import hashlib
    import importlib.metadata

    import eplb_xfer
    from eplb_xfer import _core

    info: dict[str, Any] = {"version": eplb_xfer.__version__, "path": eplb_xfer.__file__}
    with contextlib.suppress(Exception):
        dist = importlib.metadata.distribution("eplb-xfer")
        info["installed_from"] = json.loads(dist.read_text("direct_url.json") or "{}").get("url")
    with contextlib.suppress(Exception):
        core = Path(str(_core.__file__))
        info["core_sha256"] = hashlib.sha256(core.read_bytes()).hexdigest()[:16]
        info["core_mtime"] = time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.localtime(core.stat().st_mtime)
        )
    return info


def rate_bytes_per_s(rate: str) -> float:
    """A ``tc`` rate (``1gbit``, ``500mbit``, ``100mbps`` = bytes/s) in bytes per second."""
    m = re.fullmatch(r"([0-9.]+)\s*([a-z]+)", rate.strip().lower())
    if not m or m.group(2) not in _RATE_UNITS:
        raise ValueError(f"rate: expected a tc rate like 1gbit or 500mbit, got {rate!r}")
    return float(m.group(1)) * _RATE_UNITS[m.group(2)] / 8.0


def nixl_rows() -> tuple[list[Row], list[str]]:
    """NIXL rows this eplb_xfer supports, and notes on the skipped ones."""
    from eplb_xfer import NixlCommunicator

    params = inspect.signature(NixlCommunicator.__init__).parameters
    if "direction" in params:
        return [Row(f"nixl-{d}", "nixl", (("direction", d),)) for d in DIRECTIONS], []
    note = (
        "NixlCommunicator has no direction= option in this eplb_xfer (it only READs): "
        f"ran its default as 'nixl-default'; skipped {', '.join(f'nixl-{d}' for d in DIRECTIONS)}"
    )
    return [Row("nixl-default", "nixl")], [note]


def placements(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """``old -> new`` with ``changed`` of the slots re-assigned per layer (the
    generator of ``benches/rebalance.py``)."""
    from rebalance import splitmix_placements

    return splitmix_placements(
        cfg.layers, cfg.experts, cfg.slots, max(1, round(cfg.slots * cfg.changed)), cfg.seed
    )


def crossing_bytes(
    cfg: Config, old: np.ndarray, new: np.ndarray, expert_bytes: int
) -> dict[str, Any]:
    """Bytes the plan moves, per (source host -> destination host)."""
    import eplb_xfer

    plan = eplb_xfer.plan_rebalance(old, new, cfg.world, node_of_rank=cfg.nodes)
    flows: dict[str, int] = {}
    layer_busiest: list[int] = []
    received = 0
    for layer in range(cfg.layers):
        layer_flows: dict[str, int] = {}
        for dst in range(cfg.world):
            for _e, src, _sr, _dr in plan.recvs(layer, dst):
                received += expert_bytes
                a, b = cfg.nodes[src], cfg.nodes[dst]
                if a != b:
                    key = f"{a}->{b}"
                    layer_flows[key] = layer_flows.get(key, 0) + expert_bytes
        for key, n in layer_flows.items():
            flows[key] = flows.get(key, 0) + n
        layer_busiest.append(max(layer_flows.values(), default=0))
    return {
        "received": received,
        "crossing": sum(flows.values()),
        "per_direction": flows,
        "busiest_direction": max(flows.values(), default=0),
        "per_layer_busiest_direction": layer_busiest,
    }


def _tx_bytes() -> int:
    """Bytes this host's interface sent so far (this network namespace's sysfs)."""
    try:
        return int(Path(f"/sys/class/net/{IFACE}/statistics/tx_bytes").read_text())
    except OSError:
        return -1


def _rank_main(
    rank: int,
    world: int,
    cfg: Config,
    rows: list[Row],
    old: np.ndarray,
    new: np.ndarray,
) -> dict[str, Any]:
    """Every phase (unshaped, shaped), every row: restore, rebalance, time."""
    import hosts_workers
    import torch
    import torch.distributed as dist

    import eplb_xfer

    specs = model_specs(cfg.scale)
    weights, buffer = hosts_workers.build(old, rank, world, cfg.seed, specs)
    saved = [[t.clone() for t in layer] for layer in weights]
    first_of_host = rank % cfg.ranks_per_host == 0
    out: dict[str, Any] = {"rank": rank, "phases": {}}
    for phase in ("unshaped", "shaped"):
        if phase == "shaped":
            if rank == 0:
                emulated_hosts.signal_and_wait("shape", timeout_s=60.0)
            dist.barrier()
        results: dict[str, Any] = {}
        for row in rows:
            options: dict[str, Any] = dict(row.options)
            if row.backend == "nixl":
                options["timeout_s"] = cfg.timeout_s
            try:
                comm = eplb_xfer.create_communicator(row.backend, None, weights, buffer, **options)
            except (TypeError, ValueError) as e:  # an option this build lacks: same on all ranks
                results[row.name] = {"skipped": f"{type(e).__name__}: {e}"}
                continue
            seconds, wire = [], []
            mismatches = 0
            try:
                for k in range(cfg.warmup + cfg.repeats):
                    with torch.no_grad():
                        for layer, saved_layer in zip(weights, saved):
                            for t, s in zip(layer, saved_layer):
                                t.copy_(s)
                    # Read before the barrier: on few cores, peers may start
                    # sending before this rank is scheduled after it.
                    tx0 = _tx_bytes() if first_of_host else 0
                    dist.barrier()
                    stats = eplb_xfer.rearrange_expert_weights_inplace(
                        old, new, weights, buffer, None, comm, node_of_rank=cfg.nodes
                    )
                    dist.barrier()
                    if k >= cfg.warmup:
                        seconds.append(stats.seconds)
                        wire.append(_tx_bytes() - tx0 if first_of_host else 0)
                    if k == cfg.warmup + cfg.repeats - 1:
                        mismatches = len(
                            hosts_workers.check(
                                weights, old, new, rank, world, cfg.seed, specs=specs
                            )
                        )
            finally:
                comm.close()
            results[row.name] = {
                "seconds": seconds,
                "wire_tx_bytes": wire,
                "bytes_received": stats.bytes_received,
                "mismatches": mismatches,
            }
        out["phases"][phase] = results
    return out


def summarize(
    cfg: Config, per_rank: list[dict[str, Any]], rows: list[Row], flows: dict[str, Any]
) -> list[dict[str, Any]]:
    link_bps = rate_bytes_per_s(cfg.rate)
    bound = flows["busiest_direction"] / link_bps
    layer_bound = sum(flows["per_layer_busiest_direction"]) / link_bps
    table = []
    for phase in ("unshaped", "shaped"):
        for row in rows:
            ranks = [r["phases"][phase][row.name] for r in per_rank]
            if "skipped" in ranks[0]:
                table.append({"link": phase, "backend": row.name, "skipped": ranks[0]["skipped"]})
                continue
            slowest = [max(r["seconds"][k] for r in ranks) for k in range(cfg.repeats)]
            secs = statistics.median(slowest)
            wire = {
                f"{h}->{1 - h}" if cfg.hosts == 2 else f"{h}->*": statistics.median(
                    ranks[h * cfg.ranks_per_host]["wire_tx_bytes"]
                )
                for h in range(cfg.hosts)
            }
            entry: dict[str, Any] = {
                "link": cfg.rate if phase == "shaped" else "unshaped",
                "backend": row.name,
                "seconds_median": secs,
                "seconds_repeats": slowest,
                "bytes_received": sum(r["bytes_received"] for r in ranks),
                "bytes_crossing": flows["crossing"],
                "bytes_crossing_per_direction": flows["per_direction"],
                "wire_tx_bytes_per_direction": wire,
                "crossing_gbps": flows["crossing"] / secs / 1e9 if secs > 0 else 0.0,
                "mismatches": sum(r["mismatches"] for r in ranks),
            }
            if phase == "shaped":
                entry["link_bytes_per_s"] = link_bps
                entry["link_time_bound_s"] = bound
                entry["ratio_to_link_time"] = secs / bound if bound > 0 else None
                entry["layer_by_layer_bound_s"] = layer_bound
                entry["ratio_to_layer_by_layer_bound"] = (
                    secs / layer_bound if layer_bound > 0 else None
                )
            table.append(entry)
    return table


def checks(table: list[dict[str, Any]], nixl_name: str) -> dict[str, Any]:
    """Targets of issue 12: NIXL at least as fast as torch in every link
    setting, and within 1.3x of the link time for the crossing bytes."""
    out: dict[str, Any] = {}
    by = {(r["link"], r["backend"]): r for r in table if "skipped" not in r}
    for link in sorted({k[0] for k in by}):
        n, t = by.get((link, nixl_name)), by.get((link, "torch"))
        if n and t:
            ratio = n["seconds_median"] / t["seconds_median"]
            out[f"{link}: {nixl_name} / torch seconds"] = round(ratio, 3)
            out[f"{link}: {nixl_name} at least as fast as torch"] = ratio <= 1.0
        if n and n.get("ratio_to_link_time") is not None:
            out[f"{link}: {nixl_name} / link time"] = round(n["ratio_to_link_time"], 3)
            out[f"{link}: {nixl_name} within 1.3x of link time"] = n["ratio_to_link_time"] <= 1.3
    out["all_verified"] = all(r.get("mismatches", 0) == 0 for r in table)
    return out


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def format_table(table: list[dict[str, Any]]) -> str:
    head = ["link", "backend", "seconds", "crossing MB", "per direction MB", "wire MB",
            "bound s", "ratio", "layer bound s", "ratio", "cross GB/s", "mismatches"]  # fmt: skip
    body = []
    for r in table:
        if "skipped" in r:
            body.append([r["link"], r["backend"], "skipped"] + [""] * (len(head) - 3))
            continue
        per_dir = " / ".join(
            f"{k} {_mb(v)}" for k, v in sorted(r["bytes_crossing_per_direction"].items())
        )
        wire = " / ".join(_mb(v) for _k, v in sorted(r["wire_tx_bytes_per_direction"].items()))
        bound = r.get("link_time_bound_s")
        ratio = r.get("ratio_to_link_time")
        lbound = r.get("layer_by_layer_bound_s")
        lratio = r.get("ratio_to_layer_by_layer_bound")
        body.append(
            [
                r["link"],
                r["backend"],
                f"{r['seconds_median']:.3f}",
                _mb(r["bytes_crossing"]),
                per_dir,
                wire,
                "-" if bound is None else f"{bound:.3f}",
                "-" if ratio is None else f"{ratio:.2f}x",
                "-" if lbound is None else f"{lbound:.3f}",
                "-" if lratio is None else f"{lratio:.2f}x",
                f"{r['crossing_gbps']:.3f}",
                str(r["mismatches"]),
            ]
        )
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
        prog="benches/hosts.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--layers", type=int, default=d.layers, help="MoE layers")
    p.add_argument("--slots-per-rank", type=int, default=d.slots_per_rank, help="slots per rank")
    p.add_argument("--redundant", type=int, default=d.redundant, help="replica slots in total")
    p.add_argument("--changed", type=float, default=d.changed, help="fraction of slots re-assigned")
    p.add_argument(
        "--scale", type=int, default=d.scale, help="DeepSeek-V3 row dims divided by this"
    )
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed rebalances per row")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed rebalances first")
    p.add_argument("--rate", default=d.rate, help="tc tbf rate of the shaped link")
    p.add_argument("--burst", default=d.burst, help="tc tbf burst (bucket size)")
    p.add_argument("--latency", default=d.latency, help="tc tbf latency (queue limit)")
    p.add_argument("--seed", type=int, default=d.seed, help="placement and weight seed")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="NIXL per-layer deadline, s")
    p.add_argument("--backends", default="nixl,torch", help="comma-separated: nixl, torch")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of every rank (repeatable), e.g. UCX_TCP_TX_SEG_SIZE=64k",
    )
    p.add_argument("--label", default="", help="free text stored with the results (the build)")
    p.add_argument("--out", type=Path, default=RESULTS / "hosts.json", help="JSON output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ok, why = emulated_hosts.available(shaping=True)
    if not ok:
        print(f"benches/hosts.py: cannot emulate hosts here: {why}", file=sys.stderr)
        return 2
    cfg = Config(
        layers=args.layers,
        slots_per_rank=args.slots_per_rank,
        redundant=args.redundant,
        changed=args.changed,
        scale=args.scale,
        repeats=args.repeats,
        warmup=args.warmup,
        rate=args.rate,
        burst=args.burst,
        latency=args.latency,
        seed=args.seed,
        timeout_s=args.timeout,
    )
    rate_bytes_per_s(cfg.rate)  # validate early
    extra_env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"--env: expected KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        extra_env[key] = value
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows: list[Row] = []
    notes: list[str] = []
    if "nixl" in wanted:
        nrows, notes = nixl_rows()
        rows += nrows
    if "torch" in wanted:
        rows.append(Row("torch", "torch"))
    if not rows:
        print("--backends: expected nixl and/or torch", file=sys.stderr)
        return 2
    import hosts_workers

    specs = model_specs(cfg.scale)
    expert_bytes = sum(hosts_workers.row_nbytes(d, shape) for _n, d, shape in specs)
    old, new = placements(cfg)
    flows = crossing_bytes(cfg, old, new, expert_bytes)
    print(
        f"{cfg.hosts} emulated hosts x {cfg.ranks_per_host} ranks, {cfg.layers} layers, "
        f"{cfg.experts} experts in {cfg.slots} slots, {cfg.changed:.0%} changed, "
        f"{expert_bytes} B/expert; plan: {_mb(flows['received'])} MB received, "
        f"{_mb(flows['crossing'])} MB across hosts {flows['per_direction']}",
        flush=True,
    )
    for note in notes:
        print(f"note: {note}")
    build = build_info()
    t0 = time.perf_counter()
    with EmulatedHosts(cfg.hosts, cfg.ranks_per_host) as eh:
        outcomes = eh.run(
            _rank_main,
            cfg,
            rows,
            old,
            new,
            timeout_s=cfg.timeout_s * 4 + 60 * len(rows) * (cfg.repeats + cfg.warmup),
            env={**QUIET_UCX, **extra_env},
            actions=[
                Action("shape", on="shape", rate=cfg.rate, burst=cfg.burst, latency=cfg.latency)
            ],
            check=True,
        )
        qdisc = {f"host{h}": eh.qdisc_stats(h).strip() for h in range(cfg.hosts)}
    leftovers = eh.leftovers()
    wall = time.perf_counter() - t0
    table = summarize(cfg, [o.value for o in outcomes], rows, flows)
    nixl_name = next((r.name for r in rows if r.name in ("nixl-auto", "nixl-default")), "")
    summary = checks(table, nixl_name)
    result: dict[str, Any] = {
        "bench": "benches/hosts.py",
        "config": {
            **asdict(cfg),
            "expert_bytes": expert_bytes,
            "nodes": cfg.nodes,
            "extra_env": extra_env,
        },
        "plan_bytes": flows,
        "label": args.label,
        "eplb_xfer": build,
        "machine": {
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "rows": table,
        "checks": summary,
        "notes": notes,
        "qdisc_after": qdisc,
        "leftovers": leftovers,
        "wall_s": wall,
    }
    if build_info() != build:
        notes.append("eplb_xfer was reinstalled during the run: rows may mix builds")
    print()
    print(format_table(table))
    print()
    for k, v in summary.items():
        print(f"{k}: {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({wall:.0f} s)")
    return 0 if not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
