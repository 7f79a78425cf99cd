"""End-to-end CPU rebalance benchmark: NIXL zero-copy vs NIXL staged vs torch (gloo).

Spawns ``--ranks`` processes (gloo group) holding a scaled-down DeepSeek-V3
expert layout (4 tensors per expert: uint8 w13, fp32 s13, uint8 w2, fp32 s2),
rebalances ``--repeats`` times between the same two placements (old -> new ->
old ...) with each backend, checks every row byte for byte, and reports per
rank: seconds, GB/s received, staging bytes, peak RSS (``ru_maxrss``) and the
RSS growth during the rebalance (VmRSS before/after, VmHWM after resetting it).

Placements come from :func:`splitmix_placements`, the same generator as the
criterion bench ``benches/descriptor_path.rs`` (every expert present, 32
redundant replicas at DeepSeek-V3 scale, about a quarter of the slots change).

Writes ``benches/results/rebalance.json`` and (with matplotlib) ``rebalance.png``.
``--collect-criterion`` instead gathers ``cargo bench --bench descriptor_path``
medians into ``benches/results/descriptor_path.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benches" / "results"

#: Environment of the spawned ranks.
RANK_ENV = {"UCX_WARN_UNUSED_ENV_VARS": "n"}

#: (result key, create_communicator backend, options)
BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "nixl_zero_copy": ("nixl", {"mode": "zero_copy"}),
    "nixl_staged": ("nixl", {"mode": "staged"}),
    "torch_gloo": ("torch", {}),
}

# --------------------------------------------------------------------------- placements

_MASK = (1 << 64) - 1


class SplitMix64:
    """splitmix64, bit-identical to the generator in ``benches/descriptor_path.rs``."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n

    def shuffle(self, v: list[int]) -> None:
        for i in range(len(v) - 1, 0, -1):
            j = self.below(i + 1)
            v[i], v[j] = v[j], v[i]


def _old_layer(rng: SplitMix64, num_experts: int, num_slots: int) -> list[int]:
    v = list(range(num_experts))
    while len(v) < num_slots:
        v.append(rng.below(num_experts))
    rng.shuffle(v)
    return v


def _new_layer(rng: SplitMix64, old: list[int], num_experts: int, changed: int) -> list[int]:
    slots = list(range(len(old)))
    rng.shuffle(slots)
    slots = slots[:changed]
    new = list(old)
    for k, s in enumerate(slots):
        new[s] = old[slots[(k + 1) % len(slots)]]
    count = [0] * num_experts
    for e in new:
        count[e] += 1
    for s in slots:
        cur = new[s]
        if new[s] == old[s] or (count[cur] > 1 and rng.below(4) == 0):
            if count[cur] < 2:
                continue  # the only copy: keep it so every expert stays present
            e = rng.below(num_experts)
            while e == old[s]:
                e = rng.below(num_experts)
            count[cur] -= 1
            count[e] += 1
            new[s] = e
    return new


def splitmix_placements(
    num_layers: int, num_experts: int, num_slots: int, changed: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(old, new)`` int64 ``[num_layers, num_slots]``.

    ``old``: every expert once plus ``num_slots - num_experts`` random replicas,
    shuffled; ``new``: ``changed`` random slots re-assigned, every expert kept.
    With ``(58, 256, 288, 72, 0x5EEDA11)`` these are the placements of the
    criterion bench ``plan_all/ep72``.
    """
    if not 0 < num_experts <= num_slots:
        raise ValueError(f"num_experts: expected 1..{num_slots}, got {num_experts}")
    if not 0 < changed <= num_slots:
        raise ValueError(f"changed: expected 1..{num_slots}, got {changed}")
    rng = SplitMix64(seed)
    old = np.empty((num_layers, num_slots), dtype=np.int64)
    new = np.empty_like(old)
    for layer in range(num_layers):
        o = _old_layer(rng, num_experts, num_slots)
        new[layer] = _new_layer(rng, o, num_experts, changed)
        old[layer] = o
    return old, new


# --------------------------------------------------------------------------- memory probes


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (0 if unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --------------------------------------------------------------------------- the benchmark


@dataclass(frozen=True)
class Config:
    """What one run measures (every backend gets the same placements)."""

    ranks: int = 4
    layers: int = 16
    experts: int = 256
    slots: int = 288
    changed: float = 0.25
    scale: int = 16
    repeats: int = 3
    seed: int = 0x5EEDA11
    timeout_s: float = 120.0

    @property
    def changed_slots(self) -> int:
        return max(1, round(self.slots * self.changed))


def _rank_main(
    rank: int, world: int, cfg: Config, key: str, old: np.ndarray, new: np.ndarray
) -> dict[str, Any]:
    """One rank, one backend: build weights, rebalance ``repeats`` times, verify each."""
    import torch.distributed as dist

    import eplb_xfer
    from eplb_xfer._scenario import build_weights, verify
    from eplb_xfer.models import scaled

    backend, options = BACKENDS[key]
    specs = scaled("deepseek-v3", cfg.scale).specs()
    weights, buffer = build_weights(specs, old, rank, world, cfg.experts, cfg.seed)
    if backend == "nixl":
        options = {**options, "timeout_s": cfg.timeout_s}
    t0 = time.perf_counter()
    comm = eplb_xfer.create_communicator(backend, None, weights, buffer, **options)
    setup_s = time.perf_counter() - t0
    placements = (old, new)
    runs: list[dict[str, Any]] = []
    try:
        for k in range(cfg.repeats):
            src, dst = placements[k % 2], placements[(k + 1) % 2]
            gc.collect()
            dist.barrier()
            rss_before = _status_kib("VmRSS") * 1024
            hwm_reset = _reset_peak_rss()
            stats = eplb_xfer.rearrange_expert_weights_inplace(
                src, dst, weights, buffer, None, comm
            )
            rss_after = _status_kib("VmRSS") * 1024
            rss_peak = _status_kib("VmHWM") * 1024 if hwm_reset else 0
            errors = verify(specs, weights, src, dst, rank, world, cfg.experts, cfg.seed)
            runs.append(
                {
                    "seconds": stats.seconds,
                    "gbps": stats.gbps,
                    "bytes_received": stats.bytes_received,
                    "experts_received": stats.experts_received,
                    "bytes_copied_locally": stats.bytes_copied_locally,
                    "rss_before": rss_before,
                    "rss_after": rss_after,
                    "rss_peak_during": rss_peak,
                    "rss_growth": max(rss_peak, rss_after) - rss_before,
                    "mismatches": len(errors),
                    "errors": errors[:3],
                }
            )
        staging = comm.staging_bytes
    finally:
        comm.close()
    return {
        "rank": rank,
        "setup_s": setup_s,
        "staging_bytes": staging,
        "ru_maxrss": _maxrss_bytes(),
        "weights_bytes": sum(t.numel() * t.element_size() for layer in weights for t in layer),
        "runs": runs,
    }


def summarize(key: str, per_rank: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals for one backend. Per repeat, the cluster throughput is all bytes
    received over the slowest rank's seconds; the reported value is the median
    over repeats."""
    repeats = len(per_rank[0]["runs"])
    cluster_gbps, slowest = [], []
    for k in range(repeats):
        secs = max(r["runs"][k]["seconds"] for r in per_rank)
        recv = sum(r["runs"][k]["bytes_received"] for r in per_rank)
        slowest.append(secs)
        cluster_gbps.append(recv / secs / 1e9 if secs > 0 else 0.0)
    ranks = []
    for r in per_rank:
        runs = r["runs"]
        ranks.append(
            {
                "rank": r["rank"],
                "seconds_median": statistics.median(x["seconds"] for x in runs),
                "gbps_median": statistics.median(x["gbps"] for x in runs),
                "bytes_received": runs[0]["bytes_received"],
                "staging_bytes": r["staging_bytes"],
                "ru_maxrss": r["ru_maxrss"],
                "rss_growth_max": max(x["rss_growth"] for x in runs),
                "setup_s": r["setup_s"],
                "mismatches": sum(x["mismatches"] for x in runs),
            }
        )
    return {
        "backend": key,
        "seconds_median": statistics.median(slowest),
        "cluster_gbps_median": statistics.median(cluster_gbps),
        "per_rank_gbps_median": statistics.median(x["gbps_median"] for x in ranks),
        "bytes_received_per_rank_mean": statistics.fmean(x["bytes_received"] for x in ranks),
        "staging_bytes_max": max(x["staging_bytes"] for x in ranks),
        "ru_maxrss_max": max(x["ru_maxrss"] for x in ranks),
        "rss_growth_max": max(x["rss_growth_max"] for x in ranks),
        "mismatches": sum(x["mismatches"] for x in ranks),
        "ranks": ranks,
    }


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = [
        "backend",
        "seconds",
        "GB/s (all)",
        "GB/s/rank",
        "MiB/rank",
        "staging MiB",
        "peak RSS MiB",
        "RSS growth MiB",
        "mismatches",
    ]
    body = [
        [
            r["backend"],
            f"{r['seconds_median']:.3f}",
            f"{r['cluster_gbps_median']:.3f}",
            f"{r['per_rank_gbps_median']:.3f}",
            _mib(r["bytes_received_per_rank_mean"]),
            _mib(r["staging_bytes_max"]),
            _mib(r["ru_maxrss_max"]),
            _mib(r["rss_growth_max"]),
            str(r["mismatches"]),
        ]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """Bar charts of throughput and memory; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["backend"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    gb = [r["cluster_gbps_median"] for r in rows]
    ax1.bar(names, gb, color=["#2a7", "#59c", "#c75"][: len(rows)])
    ax1.set_ylabel("GB/s received, all ranks (median)")
    ax1.set_title("throughput")
    for i, v in enumerate(gb):
        ax1.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom")
    x = np.arange(len(rows))
    w = 0.38
    staging = [r["staging_bytes_max"] / (1 << 20) for r in rows]
    growth = [r["rss_growth_max"] / (1 << 20) for r in rows]
    ax2.bar(x - w / 2, staging, w, label="staging bytes")
    ax2.bar(x + w / 2, growth, w, label="RSS growth during rebalance")
    ax2.set_xticks(x, names)
    ax2.set_ylabel("MiB per rank (max over ranks)")
    ax2.set_title("extra memory")
    ax2.legend(loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def collect_criterion(target: Path, out: Path) -> dict[str, Any]:
    """Criterion medians (ns) of ``descriptor_path`` into ``out``; returns the dict."""
    ids = ["plan_layer/ep8", "plan_layer/ep32", "plan_layer/ep72", "plan_all/ep72"]
    targets_ns = {"plan_layer/ep72": 50_000.0, "plan_all/ep72": 2_000_000.0}
    benches: dict[str, Any] = {}
    for bench_id in ids:
        est = target / "criterion" / bench_id / "new" / "estimates.json"
        if not est.exists():
            raise FileNotFoundError(f"{est} (run `cargo bench --bench descriptor_path` first)")
        med = json.loads(est.read_text())["median"]
        entry: dict[str, Any] = {
            "median_ns": med["point_estimate"],
            "ci95_ns": [
                med["confidence_interval"]["lower_bound"],
                med["confidence_interval"]["upper_bound"],
            ],
        }
        if bench_id in targets_ns:
            entry["target_ns"] = targets_ns[bench_id]
            entry["target_met"] = med["point_estimate"] < targets_ns[bench_id]
        benches[bench_id] = entry
    result = {
        "bench": "cargo bench --bench descriptor_path",
        "what": (
            "plan_rebalance + select_for_plan for every rank; 256 experts, 288 slots, "
            "4 tensors/expert, 72 slots changed per layer; plan_all = 58 layers"
        ),
        "machine": _machine(),
        "benches": benches,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _machine() -> dict[str, Any]:
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benches/rebalance.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=(
            "Prints a table (median over repeats; 'GB/s (all)' = bytes received by all "
            "ranks / slowest rank's seconds) and writes benches/results/rebalance.json "
            "and rebalance.png."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = Config()
    p.add_argument("--ranks", type=int, default=d.ranks, help="processes (EP ranks)")
    p.add_argument("--layers", type=int, default=d.layers, help="MoE layers")
    p.add_argument("--experts", type=int, default=d.experts, help="logical experts")
    p.add_argument("--slots", type=int, default=d.slots, help="physical slots in total")
    p.add_argument("--changed", type=float, default=d.changed, help="fraction of slots re-assigned")
    p.add_argument(
        "--scale", type=int, default=d.scale, help="DeepSeek-V3 row dims divided by this"
    )
    p.add_argument("--repeats", type=int, default=d.repeats, help="rebalances per backend")
    p.add_argument("--seed", type=int, default=d.seed, help="placement and weight seed")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="per-run deadline, s")
    p.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"comma-separated subset of {', '.join(BACKENDS)}",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "rebalance.json", help="JSON output")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument(
        "--collect-criterion",
        action="store_true",
        help="only gather target/criterion medians into benches/results/descriptor_path.json",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.collect_criterion:
        res = collect_criterion(ROOT / "target", RESULTS / "descriptor_path.json")
        for bench_id, e in res["benches"].items():
            met = "" if "target_met" not in e else f"  target {e['target_ns'] / 1e3:.0f} us: "
            met += "" if "target_met" not in e else ("met" if e["target_met"] else "MISSED")
            print(f"{bench_id:18s} median {e['median_ns'] / 1e3:9.2f} us{met}")
        print(f"wrote {RESULTS / 'descriptor_path.json'}")
        return 0
    keys = [k.strip() for k in args.backends.split(",") if k.strip()]
    bad = [k for k in keys if k not in BACKENDS]
    if bad:
        print(f"--backends: unknown {bad}; known: {list(BACKENDS)}", file=sys.stderr)
        return 2
    if args.ranks < 2 or args.slots % args.ranks or args.repeats < 1:
        print("--ranks must be >= 2 and divide --slots; --repeats >= 1", file=sys.stderr)
        return 2
    cfg = Config(
        ranks=args.ranks,
        layers=args.layers,
        experts=args.experts,
        slots=args.slots,
        changed=args.changed,
        scale=args.scale,
        repeats=args.repeats,
        seed=args.seed,
        timeout_s=args.timeout,
    )
    from eplb_xfer._spawn import spawn_ranks
    from eplb_xfer.models import scaled

    specs = scaled("deepseek-v3", cfg.scale).specs()
    row_bytes = sum(s.row_bytes for s in specs)
    old, new = splitmix_placements(cfg.layers, cfg.experts, cfg.slots, cfg.changed_slots, cfg.seed)
    print(
        f"{cfg.ranks} ranks, {cfg.layers} layers, {cfg.experts} experts in {cfg.slots} slots, "
        f"{cfg.changed_slots} slots changed/layer, {row_bytes} B/expert "
        f"({', '.join(f'{s.name} {s.dtype} {list(s.row_shape)}' for s in specs)})",
        flush=True,
    )
    rows = []
    t_all = time.perf_counter()
    for key in keys:
        t0 = time.perf_counter()
        per_rank = spawn_ranks(
            _rank_main,
            cfg.ranks,
            cfg,
            key,
            old,
            new,
            timeout_s=cfg.timeout_s * (cfg.repeats + 2),
            env=RANK_ENV,
        )
        row = summarize(key, per_rank)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(
            f"  {key}: {row['cluster_gbps_median']:.3f} GB/s, {row['mismatches']} mismatches "
            f"({row['wall_s']:.1f} s wall)",
            flush=True,
        )
    print()
    print(format_table(rows))
    by = {r["backend"]: r for r in rows}
    checks: dict[str, Any] = {}
    if "nixl_zero_copy" in by and "torch_gloo" in by:
        ratio = by["nixl_zero_copy"]["cluster_gbps_median"] / max(
            by["torch_gloo"]["cluster_gbps_median"], 1e-12
        )
        checks["zero_copy_over_gloo"] = ratio
        checks["zero_copy_over_gloo_target"] = 3.0
        checks["zero_copy_over_gloo_met"] = ratio >= 3.0
        print(f"\nnixl zero-copy / gloo throughput: {ratio:.2f}x (target >= 3x)")
    if "nixl_zero_copy" in by:
        z = by["nixl_zero_copy"]["staging_bytes_max"]
        checks["zero_copy_staging_bytes"] = z
        checks["zero_copy_staging_met"] = z == 0
        print(f"nixl zero-copy staging bytes: {z} (target 0)")
    checks["all_verified"] = all(r["mismatches"] == 0 for r in rows)
    result = {
        "bench": "benches/rebalance.py",
        "config": {
            **asdict(cfg),
            "changed_slots": cfg.changed_slots,
            "expert_bytes": row_bytes,
            "tensors": [
                {"name": s.name, "dtype": str(s.dtype), "row_shape": list(s.row_shape)}
                for s in specs
            ],
        },
        "machine": _machine(),
        "backends": rows,
        "checks": checks,
        "wall_s": time.perf_counter() - t_all,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not args.no_plot:
        png = args.out.with_suffix(".png")
        title = (
            f"CPU, {cfg.ranks} ranks, {cfg.layers} layers, scaled DeepSeek-V3 (1/{cfg.scale}), "
            f"{cfg.changed_slots}/{cfg.slots} slots changed; {os.cpu_count()} cores"
        )
        if plot(rows, png, title):
            print(f"wrote {png}")
        else:
            print("matplotlib not installed: no PNG (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
