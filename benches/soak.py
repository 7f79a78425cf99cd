"""Soak benchmark: thousands of consecutive rebalances through one communicator.

Spawns ``--ranks`` processes; each runs the test suite's ``workers.soak``:
``--rounds`` rebalances (3 layers, 4 slots per rank, 4 tensors per expert) to
fresh random placements through one NixlCommunicator, checking every
``--check-every``-th result byte for byte. Reports per mode: rebalances per
second, RSS after warm-up and at the end, and the NIXL counters that must not
grow (live requests, live prepared lists, buffered messages).

Writes ``benches/results/soak.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
from pathlib import Path

from eplb_xfer._spawn import spawn_ranks

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the rank loop is the soak test's (workers.soak)
from workers import soak  # noqa: E402

RESULTS = ROOT / "benches" / "results"
ENV = {"UCX_WARN_UNUSED_ENV_VARS": "n", "UCX_LOG_LEVEL": "fatal"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2000, help="rebalances (default: %(default)s)")
    ap.add_argument("--ranks", type=int, default=2, help="processes (default: %(default)s)")
    ap.add_argument("--check-every", type=int, default=10, help="byte check period")
    ap.add_argument("--modes", default="zero_copy,staged,zero_copy+verify", help="comma-separated")
    ap.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = ap.parse_args(argv)
    report: dict[str, object] = {
        "machine": platform.platform(),
        "ranks": args.ranks,
        "rounds": args.rounds,
        "modes": {},
    }
    ok = True
    print(
        f"{'mode':<18} {'reb/s':>8} {'RSS warm MiB':>13} {'RSS end MiB':>12} {'growth KiB':>11} "
        f"{'req live':>9} {'lists live':>11} {'buffered':>10} {'errors':>7}"
    )
    for spec in args.modes.split(","):
        mode, _, extra = spec.partition("+")
        fn = functools.partial(soak, check_every=args.check_every, verify=extra == "verify")
        per_rank = spawn_ranks(fn, args.ranks, mode, args.rounds, timeout_s=3600.0, env=ENV)
        worst = max(per_rank, key=lambda r: r["rss_end"] - r["rss_warm"])
        growth = worst["rss_end"] - worst["rss_warm"]
        rate = args.rounds / max(r["seconds"] for r in per_rank)
        errors = sum(len(r["errors"]) for r in per_rank)
        req = sorted({v for r in per_rank for v in r["requests_live_seen"]})
        lists = sorted({v for r in per_rank for v in r["prepared_lists_live_seen"]})
        inbox = max(r["buffered_max"] for r in per_rank)
        ok &= errors == 0 and req == [0] and len(lists) == 1
        print(
            f"{spec:<18} {rate:>8.0f} {worst['rss_warm'] / 2**20:>13.1f} "
            f"{worst['rss_end'] / 2**20:>12.1f} {growth / 1024:>11.0f} {str(req):>9} "
            f"{str(lists):>11} {inbox:>10} {errors:>7}"
        )
        report["modes"][spec] = {  # type: ignore[index]
            "rebalances_per_s": rate,
            "rss_growth_bytes_worst_rank": growth,
            "requests_live_seen": req,
            "prepared_lists_live_seen": lists,
            "buffered_max": inbox,
            "errors": errors,
            "per_rank": per_rank,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
