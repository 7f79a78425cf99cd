"""Run a function on N local ranks (processes) with a gloo process group.

Used by the demo, the benchmarks and the tests. Children are always reaped:
on timeout or failure every still-running child is killed.
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable, Collection
from typing import Any

import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """One or more ranks raised; the message holds their tracebacks."""


def _child(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    init_file: str,
    args: tuple[Any, ...],
    out: Any,
    env: dict[str, str],
    destroy_group: bool,
) -> None:
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
        )
        try:
            result = fn(rank, world, *args)
        finally:
            if destroy_group:
                dist.destroy_process_group()
        out.put((rank, True, result))
    except BaseException as e:  # report everything, including SystemExit
        out.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def spawn_ranks(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
    allow_failures: bool = False,
    wait_for: Collection[int] | None = None,
    pids: list[int] | None = None,
    destroy_group: bool = True,
) -> list[Any]:
    """Runs ``fn(rank, world, *args)`` in ``world`` spawned processes.

    Returns the per-rank results (rank order). ``fn`` must be importable
    (module level). With ``allow_failures``, a failed rank's entry is the
    ``RankFailed`` describing it instead of raising.

    ``wait_for`` (ranks): return once those ranks reported; the others (say,
    a rank made to hang) are killed and reported as failed. ``pids``, if
    given, receives the children's process ids (to check none outlives this).
    ``destroy_group=False`` skips destroying the process group at the end
    (a rank whose peers died would wait in it).
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="eplbx-") as tmp:
        init_file = os.path.join(tmp, "pg")
        procs = [
            ctx.Process(
                target=_child,
                args=(fn, r, world, init_file, args, out, dict(env or {}), destroy_group),
                daemon=True,
            )
            for r in range(world)
        ]
        for p in procs:
            p.start()
        if pids is not None:
            pids.extend(int(p.pid or 0) for p in procs)
        awaited = set(range(world) if wait_for is None else wait_for)
        results: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while not awaited <= results.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    rank, ok, value = out.get(timeout=min(left, 1.0))
                    results[rank] = (ok, value)
                except queue.Empty:
                    dead = [
                        r
                        for r, p in enumerate(procs)
                        if not p.is_alive() and r not in results and p.exitcode not in (0, None)
                    ]
                    for r in dead:
                        results[r] = (False, f"rank {r} died with exit code {procs[r].exitcode}")
        finally:
            for r, p in enumerate(procs):
                if r in awaited:
                    left = max(0.0, min(10.0, deadline - time.monotonic()))
                    p.join(timeout=left if results else 0.1)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        missing = [r for r in range(world) if r not in results]
        for r in missing:
            why = (
                f"produced no result within {timeout_s:.0f}s"
                if r in awaited
                else "was killed once the awaited ranks had finished"
            )
            results[r] = (False, f"rank {r} {why}")
    failures = {r: v for r, (ok, v) in results.items() if not ok}
    if failures and not allow_failures:
        msg = "\n".join(f"--- rank {r} ---\n{v}" for r, v in sorted(failures.items()))
        raise RankFailed(msg)
    return [v if ok else RankFailed(str(v)) for r, (ok, v) in sorted(results.items())]
