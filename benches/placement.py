"""EPLB placement benchmark: bytes moved per rebalance, stock vs migration-aware.

Synthetic per-expert loads (lognormal or Zipf, DeepSeek-V3 shape: 256 experts,
8 groups, 58 MoE layers) drift multiplicatively by ``exp(drift * N(0, 1))``
per expert between rebalances; 20 consecutive rebalances per seed. Three
policies each follow their own chain of placements from the same start (stock
on the first load):

* ``stock``: DeepSeek's EPLB algorithm (our Rust implementation; it matches
  DeepSeek's reference, see ``--deepseek``), ignoring where experts are;
* ``relabel``: stock with nodes and ranks renamed to overlap the old placement;
* ``ours``: ``eplb_xfer.rebalance_experts`` with the old placement.

Shapes: EP32 on 4 nodes with 288 slots, EP64 on 8 nodes with 320 slots, EP8 on
one node with 264 slots.

Bytes moved: per layer and rank, the distinct logical experts the rank holds
in the new placement but not in the old one (each received once; duplicates
are filled locally), times 44,050,944 B (one DeepSeek-V3 FP8 expert: w13, its
scales, w2, its scales). Balance: max rank load / mean rank load, per layer,
on the planned load and on the next interval's load (averaged over layers and
rebalances). The guard check recomputes every layer's sorted rank loads here
(numpy) and counts layers where ours exceeds stock's on any prefix. Timing:
one call for all 58 layers with one worker thread (``threads=1``).

Writes ``benches/results/placement.json`` and (with matplotlib)
``benches/results/placement.png``, and prints a table. ``--timing`` instead times
the calls alone (each the fastest of ``--repeats``, which filters out the noise
of a shared machine) into ``benches/results/placement_timing.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eplb_xfer import placement

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benches" / "results"

#: One DeepSeek-V3 FP8 expert (see ``eplb_xfer.models``).
EXPERT_BYTES = 44_050_944
EXPERTS, GROUPS, LAYERS = 256, 8, 58
#: name -> (num_replicas, num_nodes, num_ranks)
SHAPES = {"ep32": (288, 4, 32), "ep64": (320, 8, 64), "ep8": (264, 1, 8)}
METHODS = ("stock", "relabel", "ours")


def initial_loads(rng: np.random.Generator, dist: str, layers: int) -> np.ndarray:
    """Per-expert loads (tokens), skewed as in MoE serving."""
    if dist == "lognormal":
        return rng.lognormal(0.0, 1.0, (layers, EXPERTS)) * 1000.0
    if dist == "zipf":
        ranks = np.stack([rng.permutation(EXPERTS) for _ in range(layers)])
        return 1e5 / (ranks + 1.0) ** 0.9
    raise ValueError(f"dist: unknown {dist!r}")


def received(old: np.ndarray, new: np.ndarray, ranks: int) -> np.ndarray:
    """``[layers, ranks]`` distinct experts each rank holds in ``new`` but not ``old``."""
    layers, slots = new.shape
    spr = slots // ranks
    rank_of = np.arange(slots) // spr

    def presence(p: np.ndarray) -> np.ndarray:
        have = np.zeros((layers, ranks, EXPERTS + 1), dtype=bool)
        li = np.repeat(np.arange(layers), slots)
        have[li, np.tile(rank_of, layers), np.where(p < 0, EXPERTS, p).ravel()] = True
        return have[:, :, :EXPERTS]

    return (presence(new) & ~presence(old)).sum(axis=2)


def rank_loads(w: np.ndarray, p: np.ndarray, ranks: int) -> np.ndarray:
    """``[layers, ranks]``: sum over a rank's slots of load / replicas."""
    layers, slots = p.shape
    cnt = np.zeros((layers, EXPERTS))
    np.add.at(cnt, (np.repeat(np.arange(layers), slots), p.ravel()), 1.0)
    per_slot = np.take_along_axis(w, p, axis=1) / np.take_along_axis(cnt, p, axis=1)
    return per_slot.reshape(layers, ranks, -1).sum(axis=2)


def max_over_mean(w: np.ndarray, p: np.ndarray, ranks: int) -> float:
    loads = rank_loads(w, p, ranks)
    return float((loads.max(axis=1) / loads.mean(axis=1)).mean())


def guard_violations(w: np.ndarray, ours: np.ndarray, stock: np.ndarray, ranks: int) -> int:
    """Layers whose sorted rank-load prefix sums exceed stock's anywhere."""
    a = np.cumsum(-np.sort(-rank_loads(w, ours, ranks), axis=1), axis=1)
    b = np.cumsum(-np.sort(-rank_loads(w, stock, ranks), axis=1), axis=1)
    return int((a > b + 1e-9 * b[:, -1:]).any(axis=1).sum())


def plan(method: str, w: np.ndarray, shape: tuple[int, int, int], old: np.ndarray) -> np.ndarray:
    replicas, nodes, ranks = shape
    arg_old = None if method == "stock" else old
    name = {"stock": "stock", "relabel": "relabel", "ours": "migrate"}[method]
    # `_plan` is `rebalance_experts` with a thread count (1: one core).
    p = placement._plan(w, replicas, GROUPS, nodes, ranks, arg_old, method=name, threads=1)
    return p.numpy()


def run_chain(
    shape_name: str, dist: str, drift: float, seed: int, rebalances: int, deepseek: Any
) -> dict[str, Any]:
    replicas, nodes, ranks = SHAPES[shape_name]
    rng = np.random.default_rng([seed, int(drift * 1000), len(dist)])
    loads = [initial_loads(rng, dist, LAYERS)]
    for _ in range(rebalances + 1):
        loads.append(loads[-1] * np.exp(drift * rng.standard_normal(loads[-1].shape)))
    start = plan("stock", loads[0], SHAPES[shape_name], np.zeros(0))
    current = {m: start for m in METHODS}
    out: dict[str, Any] = {m: {k: [] for k in ("experts", "per_gpu_max", "planned", "next",
                                                 "ms")} for m in METHODS}  # fmt: skip
    out["ours"]["guard_violations"] = 0
    ds_checked = ds_same_loads = ds_same_phy2log = 0
    for t in range(1, rebalances + 1):
        w, w_next = loads[t], loads[t + 1]
        new = {}
        for m in METHODS:
            t0 = time.perf_counter()
            new[m] = plan(m, w, SHAPES[shape_name], current[m])
            out[m]["ms"].append(1e3 * (time.perf_counter() - t0))
        for m in METHODS:
            recv = received(current[m], new[m], ranks)
            out[m]["experts"].append(int(recv.sum()))
            out[m]["per_gpu_max"].append(int(recv.max()))
            out[m]["planned"].append(max_over_mean(w, new[m], ranks))
            out[m]["next"].append(max_over_mean(w_next, new[m], ranks))
        out["ours"]["guard_violations"] += guard_violations(w, new["ours"], new["stock"], ranks)
        if deepseek is not None:
            ds = deepseek.rebalance_experts(torch.from_numpy(w), replicas, GROUPS, nodes, ranks)
            ds_p = ds[0].numpy()
            ds_checked += 1
            ds_same_phy2log += int(np.array_equal(ds_p, new["stock"]))
            a = np.sort(rank_loads(w, ds_p, ranks), axis=1)
            b = np.sort(rank_loads(w, new["stock"], ranks), axis=1)
            # To float32 precision: the reference sorts float32 loads with an
            # unstable sort, so distinct experts whose loads round to the same
            # float32 may be placed in either order.
            ds_same_loads += int(np.allclose(a, b, rtol=1e-6, atol=0.0))
        current = new
    if deepseek is not None:
        out["deepseek_check"] = {
            "rebalances": ds_checked,
            "identical_phy2log": ds_same_phy2log,
            "identical_sorted_loads": ds_same_loads,
        }
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds and rebalances of one (shape, dist, drift)."""
    _, _, ranks = SHAPES[runs[0]["shape"]]
    s: dict[str, Any] = {}
    for m in METHODS:
        experts = [x for r in runs for x in r[m]["experts"]]
        s[m] = {
            "gb_per_rebalance": statistics.mean(experts) * EXPERT_BYTES / 1e9,
            "experts_per_gpu_per_layer": statistics.mean(experts) / (ranks * LAYERS),
            "max_experts_per_gpu_per_layer": max(x for r in runs for x in r[m]["per_gpu_max"]),
            "planned_max_over_mean": statistics.mean(x for r in runs for x in r[m]["planned"]),
            "next_max_over_mean": statistics.mean(x for r in runs for x in r[m]["next"]),
            "ms_per_call_median": statistics.median(x for r in runs for x in r[m]["ms"]),
        }
    for m in ("relabel", "ours"):
        ratio = s[m]["gb_per_rebalance"] / s["stock"]["gb_per_rebalance"]
        s[m]["bytes_saved_vs_stock"] = 1.0 - ratio
    s["ours"]["guard_violations"] = sum(r["ours"]["guard_violations"] for r in runs)
    s["ours"]["next_vs_stock"] = (
        s["ours"]["next_max_over_mean"] / s["stock"]["next_max_over_mean"] - 1.0
    )
    return s


def table(summary: list[dict[str, Any]]) -> str:
    head = [
        "shape", "load", "drift", "stock GB", "relabel GB", "ours GB", "saved",
        "recv/GPU/layer s|o", "planned s|o", "next s|o", "next +%", "guard", "ms s|o",
    ]  # fmt: skip
    rows = [head]
    for e in summary:
        s, r, o = e["stock"], e["relabel"], e["ours"]
        rows.append([
            e["shape"], e["dist"], f"{e['drift']:.0%}",
            f"{s['gb_per_rebalance']:.0f}", f"{r['gb_per_rebalance']:.0f}",
            f"{o['gb_per_rebalance']:.0f}", f"{o['bytes_saved_vs_stock']:.1%}",
            f"{s['experts_per_gpu_per_layer']:.2f}|{o['experts_per_gpu_per_layer']:.2f}",
            f"{s['planned_max_over_mean']:.3f}|{o['planned_max_over_mean']:.3f}",
            f"{s['next_max_over_mean']:.3f}|{o['next_max_over_mean']:.3f}",
            f"{o['next_vs_stock']:+.2%}", str(o["guard_violations"]),
            f"{s['ms_per_call_median']:.1f}|{o['ms_per_call_median']:.1f}",
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    drifts = results["config"]["drifts"]
    shapes = results["config"]["shapes"]
    fig, axes = plt.subplots(
        len(drifts), len(shapes), figsize=(4.2 * len(shapes), 3.0 * len(drifts)), squeeze=False
    )
    styles = {"stock": ("tab:red", "-"), "relabel": ("tab:orange", "--"), "ours": ("tab:blue", "-")}
    for i, drift in enumerate(drifts):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            runs = [
                r for r in results["runs"]
                if r["shape"] == shape and r["drift"] == drift and r["dist"] == "lognormal"
            ]  # fmt: skip
            if not runs:
                continue
            x = np.arange(1, len(runs[0]["stock"]["experts"]) + 1)
            for m in METHODS:
                gb = np.mean([r[m]["experts"] for r in runs], axis=0) * EXPERT_BYTES / 1e9
                color, ls = styles[m]
                ax.plot(x, gb, ls, color=color, label=m if m != "ours" else "ours (eplb-xfer)")
            ax.set_title(f"{shape}, lognormal, drift {drift:.0%}", fontsize=9)
            ax.set_ylim(bottom=0)
            if i == len(drifts) - 1:
                ax.set_xlabel("rebalance")
            if j == 0:
                ax.set_ylabel("GB moved (DeepSeek-V3 FP8)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Bytes moved per rebalance: DeepSeek's EPLB (stock) vs migration-aware (ours)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def timing(
    shapes: list[str], drifts: list[float], repeats: int, calls: int
) -> list[dict[str, Any]]:
    """Milliseconds per call (all layers, one thread), each call the fastest of
    ``repeats`` (robust to a shared machine), averaged over ``calls``
    consecutive rebalances of a lognormal chain."""
    rows = []
    for shape in shapes:
        for drift in drifts:
            rng = np.random.default_rng([7, int(drift * 1000)])
            w = initial_loads(rng, "lognormal", LAYERS)
            ours = plan("stock", w, SHAPES[shape], np.zeros(0))
            best: dict[str, list[float]] = {m: [] for m in METHODS}
            for _ in range(calls):
                w = w * np.exp(drift * rng.standard_normal(w.shape))
                for m in METHODS:
                    times = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        p = plan(m, w, SHAPES[shape], ours)
                        times.append(1e3 * (time.perf_counter() - t0))
                    best[m].append(min(times))
                    if m == "ours":
                        new_ours = p
                ours = new_ours
            rows.append(
                {"shape": shape, "drift": drift, **{m: statistics.mean(best[m]) for m in METHODS}}
            )
            print(
                f"{shape} drift {drift:.0%}: ms per call (one thread, fastest of {repeats}): "
                + ", ".join(f"{m} {statistics.mean(best[m]):.2f}" for m in METHODS)
            )
    return rows


def load_deepseek(path: str) -> Any:
    """DeepSeek's ``eplb.py`` from a path the user provides (not shipped here)."""
    spec = importlib.util.spec_from_file_location("deepseek_eplb", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--deepseek: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    p.add_argument("--rebalances", type=int, default=20, help="rebalances per chain")
    p.add_argument("--shapes", default="ep32,ep64,ep8")
    p.add_argument("--dists", default="lognormal,zipf")
    p.add_argument("--drifts", default="0.05,0.15,0.3")
    p.add_argument(
        "--deepseek",
        metavar="EPLB_PY",
        help="path to DeepSeek's eplb.py: also compare its placements with our stock ones",
    )
    p.add_argument(
        "--timing",
        action="store_true",
        help="only time the calls (fastest of --repeats per call, one thread), write "
        "placement_timing.json next to --out, and exit",
    )
    p.add_argument("--repeats", type=int, default=5, help="repeats per call with --timing")
    p.add_argument("--out", default=str(RESULTS / "placement.json"))
    args = p.parse_args(argv)
    if args.timing:
        drifts = [float(d) for d in args.drifts.split(",")]
        rows = timing(args.shapes.split(","), drifts, args.repeats, 10)
        out = Path(args.out).with_name("placement_timing.json")
        text = json.dumps(
            {"machine": platform.platform(), "repeats": args.repeats, "timing": rows}, indent=1
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
        print(f"wrote {out}")
        return 0
    shapes = args.shapes.split(",")
    dists = args.dists.split(",")
    drifts = [float(d) for d in args.drifts.split(",")]
    deepseek = load_deepseek(args.deepseek) if args.deepseek else None
    runs = []
    summary = []
    t_start = time.perf_counter()
    for shape in shapes:
        for dist in dists:
            for drift in drifts:
                group = []
                for seed in range(args.seeds):
                    r = run_chain(shape, dist, drift, seed, args.rebalances, deepseek)
                    r.update(shape=shape, dist=dist, drift=drift, seed=seed)
                    group.append(r)
                    print(
                        f"{shape} {dist} drift {drift:.0%} seed {seed}: stock "
                        f"{statistics.mean(r['stock']['experts']):.0f} experts/rebalance, ours "
                        f"{statistics.mean(r['ours']['experts']):.0f}",
                        file=sys.stderr,
                    )
                runs.extend(group)
                summary.append({"shape": shape, "dist": dist, "drift": drift, **summarize(group)})
    results = {
        "config": {
            "experts": EXPERTS, "groups": GROUPS, "layers": LAYERS, "expert_bytes": EXPERT_BYTES,
            "shapes": shapes, "dists": dists, "drifts": drifts, "seeds": args.seeds,
            "rebalances": args.rebalances,
            "shape_params": {s: dict(zip(("num_replicas", "num_nodes", "num_ranks"), SHAPES[s]))
                             for s in shapes},
            "machine": platform.platform(), "python": platform.python_version(),
            "seconds": time.perf_counter() - t_start,
        },
        "summary": summary,
        "runs": runs,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(table(summary))
    png = out.with_suffix(".png")
    if plot(results, png):
        print(f"wrote {out} and {png}")
    else:
        print(f"wrote {out} (no matplotlib: no plot)")
    if deepseek is not None:
        checks = [r["deepseek_check"] for r in runs]
        n = sum(c["rebalances"] for c in checks)
        print(
            f"DeepSeek's eplb.py vs our stock: same sorted rank loads (float32 precision) in "
            f"{sum(c['identical_sorted_loads'] for c in checks)}/{n} rebalances, identical "
            f"phy2log in {sum(c['identical_phy2log'] for c in checks)}/{n}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
