"""The ``eplb-xfer`` command line (also ``python -m eplb_xfer``).

Subcommands:

* ``demo``: a verified rebalance of a scaled-down model on N local CPU ranks;
* ``memory``: per-rank transfer memory of each communicator design.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from .demo import BACKENDS, MODES, POLICIES
from .models import MODELS


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    return parse


def _positive_float() -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
        return value

    return parse


def _int_list(text: str) -> list[int]:
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(
                f"expected positive ints separated by commas (e.g. 8,16), got {text!r}"
            )
        values.append(int(part))
    return values


def _model_list(text: str) -> list[str]:
    if text == "all":
        return list(MODELS)
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown model(s) {', '.join(unknown) or repr(text)}; "
            f"known: {', '.join(MODELS)} (or 'all')"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``eplb-xfer``."""
    p = argparse.ArgumentParser(
        prog="eplb-xfer",
        description="Move MoE expert weights between EP ranks during EPLB rebalancing.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser(
        "demo",
        help="verified rebalance of a scaled-down model on N local CPU ranks",
        description=(
            "Spawn N local ranks on CPU, give each a scaled-down copy of a model's expert "
            "layers, rebalance to random placements through one communicator, verify every "
            "slot byte for byte and print per-rank statistics. Exit code 0 only if every "
            "slot verified."
        ),
    )
    d.add_argument(
        "--model",
        default="deepseek-v3",
        choices=list(MODELS),
        help="expert shapes to scale down (default: %(default)s)",
    )
    d.add_argument(
        "--scale",
        type=_int_at_least(1),
        default=16,
        help="divide every row dimension by this (default: %(default)s)",
    )
    d.add_argument(
        "--ranks",
        type=_int_at_least(2),
        default=4,
        help="local EP ranks (processes) to spawn (default: %(default)s)",
    )
    d.add_argument(
        "--layers",
        type=_int_at_least(1),
        default=4,
        help="MoE layers (default: %(default)s)",
    )
    d.add_argument(
        "--experts",
        type=_int_at_least(1),
        default=None,
        help="logical experts per layer (default: 4 x ranks); each rank gets "
        "ceil(experts/ranks) + 1 slots, so there are redundant replicas",
    )
    d.add_argument(
        "--empty-slots",
        type=_int_at_least(0),
        default=0,
        help="slots per layer left empty (-1) instead of holding a replica (default: 0)",
    )
    d.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default="nixl",
        help="nixl (NIXL READ) or torch (torch.distributed P2P over gloo) (default: nixl)",
    )
    d.add_argument(
        "--mode",
        choices=list(MODES),
        default=None,
        help="NIXL mode: read peers' weights directly, or through one packed send layer "
        "(default: zero_copy; nixl only)",
    )
    d.add_argument(
        "--timeout",
        type=_positive_float(),
        default=None,
        help="per-layer deadline in seconds of the NIXL exchange (default: 60; nixl only)",
    )
    d.add_argument(
        "--repeat",
        type=_int_at_least(1),
        default=1,
        help="rebalances to run, each to a new random placement (default: %(default)s)",
    )
    d.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of placements and weight contents (default: %(default)s)",
    )
    d.add_argument(
        "--policy",
        choices=list(POLICIES),
        default=None,
        help="plan the placements with an EPLB policy on synthetic drifting loads (stock: "
        "DeepSeek's EPLB; ours: migration-aware) and report bytes moved per rebalance "
        "(default: random placements)",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    d.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-': stdout)")
    d.set_defaults(subparser=d)

    m = sub.add_parser(
        "memory",
        help="per-rank transfer memory of each communicator design",
        description=(
            "Per-rank memory of the rebalance transfer path (GiB) for vLLM's NIXL communicator "
            "generations and eplb-xfer, from each model's bytes per expert."
        ),
    )
    m.add_argument(
        "--model",
        type=_model_list,
        default=list(MODELS),
        metavar="NAMES",
        help=f"comma-separated models or 'all' (default: all: {', '.join(MODELS)})",
    )
    m.add_argument(
        "--ep",
        type=_int_list,
        default=[8, 16, 32, 64],
        metavar="SIZES",
        help="comma-separated EP sizes (default: 8,16,32,64)",
    )
    m.add_argument(
        "--redundancy",
        type=_int_at_least(0),
        default=None,
        help="redundant physical experts in total (default: ep, one per rank)",
    )
    m.add_argument("--json", metavar="PATH", help="also write the rows as JSON ('-': stdout)")
    m.set_defaults(subparser=m)
    return p


def _cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .demo import DemoConfig, run_demo, write_json

    if args.backend == "torch":
        for flag, value in (("--mode", args.mode), ("--timeout", args.timeout)):
            if value is not None:
                parser.error(f"{flag}: applies to --backend nixl only")
    cfg = DemoConfig(
        model=args.model,
        scale=args.scale,
        ranks=args.ranks,
        layers=args.layers,
        experts=args.experts,
        empty_slots=args.empty_slots,
        backend=args.backend,
        mode=args.mode or "zero_copy",
        timeout_s=args.timeout if args.timeout is not None else 60.0,
        seed=args.seed,
        repeat=args.repeat,
        progress=not args.no_progress,
        policy=args.policy,
    )
    try:
        cfg.validate()
    except ValueError as e:
        name, _, rest = str(e).partition(":")
        parser.error(f"--{name.replace('_', '-')}:{rest}")
    result = run_demo(cfg, out=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        write_json(result, args.json)
    return 0 if result["ok"] else 1


def _cmd_memory(args: argparse.Namespace) -> int:
    from .memory import LEGEND, format_table, memory_table

    rows = memory_table(args.model, args.ep, redundancy=args.redundancy)
    out = sys.stderr if args.json == "-" else sys.stdout
    red = (
        "one redundant slot per rank (redundancy = ep)"
        if args.redundancy is None
        else f"{args.redundancy} redundant experts in total"
    )
    out.write(f"Memory per rank; physical experts = experts + redundancy, {red}.\n")
    out.write(format_table(rows) + "\n\n" + LEGEND + "\n")
    if args.json:
        text = json.dumps(rows, indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``eplb-xfer``; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "demo":
            return _cmd_demo(args, args.subparser)
        return _cmd_memory(args)
    except SystemExit as e:  # argparse errors (2) and --help (0) as a return value
        return e.code if isinstance(e.code, int) else 1
