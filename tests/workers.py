"""Rank functions run in spawned processes by the tests (must be importable).

Each returns plain data; the test process asserts on it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from harness import (
    MIXED,
    build,
    check,
    rss_bytes,
    scenario,
    snapshot,
    unchanged,
    use_shim,
    vllm_commit,
    vllm_layer_moves,
    vllm_move_layer,
)

import eplb_xfer
from eplb_xfer import _core


def make_comm(backend: str, weights, buffer, **options: Any) -> Any:
    if backend == "vllm":
        # what vLLM's factory returns for "nixl" once the plugin is registered
        from types import SimpleNamespace

        from eplb_xfer.vllm import VllmNixlCommunicator

        coordinator = SimpleNamespace(cpu_group=dist.new_group(backend="gloo"))
        return VllmNixlCommunicator(coordinator, weights, buffer, **options)
    if backend == "torch":
        options.pop("mode", None)
        return eplb_xfer.create_communicator("torch", None, weights, buffer)
    options.setdefault("timeout_s", 30.0)
    return eplb_xfer.create_communicator("nixl", None, weights, buffer, **options)


# -- the driver ---------------------------------------------------------------------


def rebalance_cases(rank: int, world: int, backend: str, seeds: list[int], **options: Any):
    """Random rebalances through the driver; per seed the mismatches."""
    report = []
    for seed in seeds:
        layers, n_local = 1 + seed % 3, 2 + seed % 3
        old, new, _e = scenario(seed, world, layers, n_local, empty=seed % 2)
        if seed % 5 == 0:
            new = old.copy()  # nothing moves
        weights, buffer = build(MIXED, old, rank, world)
        comm = make_comm(backend, weights, buffer, **options)
        try:
            stats = eplb_xfer.rearrange_expert_weights_inplace(
                old, new, weights, buffer, None, comm
            )
            directions = getattr(comm, "directions", None)
        finally:
            comm.close()
        assert stats.layers == len(stats.layer_seconds) == layers
        assert stats.bytes_received == sum(stats.per_peer_bytes.values())
        report.append(
            {
                "seed": seed,
                "errors": check(MIXED, weights, old, new, rank, world),
                "received": stats.experts_received,
                "staging": comm.staging_bytes,
                "directions": directions,
            }
        )
    return report


def repeated_rebalances(rank: int, world: int, mode: str, rounds: int):
    """One communicator, several rebalances: prepared lists are built once."""
    old, _, experts = scenario(100, world, 2, 3)
    weights, buffer = build(MIXED, old, rank, world)
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, mode=mode, timeout_s=30.0)
    lists_after_setup = comm.counters["prepared_lists_live"]
    rng = np.random.default_rng(101)
    errors = []
    cur = old
    from harness import placement

    for _ in range(rounds):
        nxt = placement(rng, cur.shape[0], experts, cur.shape[1])
        eplb_xfer.rearrange_expert_weights_inplace(cur, nxt, weights, buffer, None, comm)
        errors += check(MIXED, weights, old, nxt, rank, world)
        cur = nxt
    out = {
        "lists_after_setup": lists_after_setup,
        "lists_end": comm.counters["prepared_lists_live"],
        "requests_live": comm.counters["requests_live"],
        "staging": comm.staging_bytes,
        "errors": errors,
        "nodes": comm.node_of_rank,
        "directions": comm.directions,
    }
    comm.close()
    out["agents_after_close"] = _core.live_agents()
    return out


# -- vLLM's call sequence -------------------------------------------------------------


def vllm_style(rank: int, world: int, backend: str, seeds: list[int], style: str, **options: Any):
    """Drives a communicator the way vLLM's EPLB driver does, with vLLM's
    own sender/receiver choice (``harness.vllm_layer_moves``):

    * ``"context"``: per layer ``set_transfer_context(old[layer], layer)``,
      add_send / add_recv, ``execute()``, then the caller commits;
    * ``"old_indices"``: the older ``execute(old_indices=...)`` style with a
      freshly allocated buffer for every rebalance (receive targets outside
      the registered buffer);
    * ``"thread"``: async EPLB: a background thread moves every layer
      (``set_stream(None)`` first), the caller commits after each layer;
    * ``"twice"``: two rebalances on one communicator.
    """
    report = []
    for seed in seeds:
        old, new, _e = scenario(seed, world, 3, 3, empty=1)
        weights, buffer = build(MIXED, old, rank, world)
        comm = make_comm(backend, weights, buffer, **options)
        assert comm.needs_profile_buffer_reservation is False
        steps = [(old, new)] if style != "twice" else [(old, new), (new, old)]
        errors: list[str] = []
        content = old  # what each slot holds (a -1 of a placement keeps it)
        for cur, nxt in steps:
            if style == "thread":
                errors += _vllm_async(comm, weights, buffer, cur, nxt, rank, world)
            else:
                errors += _vllm_sync(comm, weights, buffer, cur, nxt, rank, world, style)
            errors += check(MIXED, weights, content, nxt, rank, world)
            content = np.where(nxt >= 0, nxt, content)
        report.append({"seed": seed, "errors": errors, "staging": comm.staging_bytes})
        comm.close()
    return report


def _vllm_layer(comm, weights, buffer, cur, nxt, layer, rank, world, style):
    received: dict[int, list[torch.Tensor]] | None = None
    if style == "old_indices":
        # a freshly allocated receive tensor per expert (older vLLM allocated
        # a new buffer every rebalance)
        _l, _s, recvs, _d = vllm_layer_moves(cur[layer], nxt[layer], rank, world)
        received = {d: [torch.empty_like(b[d]) for b in buffer] for _src, _e, d in recvs}
    # the older style passes old_indices to execute; zero-copy still needs the layer
    context = style != "old_indices" or getattr(comm, "mode", "staged") == "zero_copy"
    moves = vllm_move_layer(
        comm, weights[layer], buffer, cur[layer], nxt[layer], layer, rank, world,
        received=received, context=context,
    )  # fmt: skip
    return moves, received


def _vllm_sync(comm, weights, buffer, cur, nxt, rank, world, style):
    for layer in range(cur.shape[0]):
        moves, received = _vllm_layer(comm, weights, buffer, cur, nxt, layer, rank, world, style)
        vllm_commit(weights[layer], buffer, moves, nxt[layer], rank, world, received)
    return []


def _vllm_async(comm, weights, buffer, cur, nxt, rank, world):
    """A background thread moves one layer at a time; the main thread
    commits each layer once the worker published it."""
    done = threading.Semaphore(0)
    consumed = threading.Semaphore(0)
    results: list[Any] = []
    failure: list[BaseException] = []

    def worker() -> None:
        try:
            comm.set_stream(None)
            for layer in range(cur.shape[0]):
                results.append(
                    _vllm_layer(comm, weights, buffer, cur, nxt, layer, rank, world, "context")
                )
                done.release()
                consumed.acquire()
        except BaseException as e:  # report to the main thread
            failure.append(e)
            done.release()

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    for layer in range(cur.shape[0]):
        done.acquire()
        if failure:
            raise failure[0]
        moves, received = results[layer]
        vllm_commit(weights[layer], buffer, moves, nxt[layer], rank, world, received)
        consumed.release()
    t.join(30)
    return [] if not t.is_alive() else ["async worker did not finish"]


def elastic(rank: int, world: int, backend: str, direction: str):
    """vLLM's elastic EP through ``rank_mapping``. ``"down"``: 3 ranks, rank 2
    leaves (it only sends); ``"up"``: 3 ranks, rank 2 is new (holds nothing)."""
    n = 3
    rng = np.random.default_rng(7)
    experts = 5
    from harness import placement

    if direction == "down":
        old = placement(rng, 2, experts, world * n)  # all 3 ranks hold experts
        new_small = placement(rng, 2, experts, (world - 1) * n)  # 2 ranks remain
        mapping = {0: 0, 1: 1, 2: -1}
        wide_new = np.full_like(old, -1)
        wide_new[:, : 2 * n] = new_small
        start, expect_new = old, wide_new
        call_old, call_new = old, new_small
    else:
        old_small = placement(rng, 2, experts, (world - 1) * n)
        new = placement(rng, 2, experts, world * n)
        mapping = {0: 0, 1: 1}
        wide_old = np.full((2, world * n), -1, dtype=np.int64)
        wide_old[:, : 2 * n] = old_small
        start, expect_new = wide_old, new
        call_old, call_new = old_small, new
    weights, buffer = build(MIXED, start, rank, world)
    comm = make_comm(backend, weights, buffer)
    try:
        eplb_xfer.rearrange_expert_weights_inplace(
            call_old, call_new, weights, buffer, None, comm, rank_mapping=mapping
        )
    finally:
        comm.close()
    return check(MIXED, weights, start, expect_new, rank, world)


# -- failures -------------------------------------------------------------------------


def dead_peer(rank: int, world: int, mode: str, victims: list[int], how: str, seq: int):
    """``victims`` fail at a chosen point of a 4-layer rebalance in which every
    layer moves (exchange ``seq``: 1 = opening handshake, layer l = l + 2,
    closing handshake = 6); survivors report what they saw.

    ``how``: a shim fault (``exit_before_ready``, ``hang_before_done``,
    ``exit_mid_done``, ``mute``) at ``seq``; ``exit_after_layer`` (the
    caller exits after committing layer ``seq``); ``kill_after_setup``.
    """
    n_local, layers = 3, 4
    experts = world * n_local - world
    rng = np.random.default_rng(11)
    from harness import placement

    old = placement(rng, layers, experts, world * n_local)
    new = np.roll(old, n_local, axis=1)  # every rank gets another rank's experts
    weights, buffer = build(MIXED, old, rank, world)
    snap = snapshot(weights)
    victim = rank in victims
    use_shim(
        f"{how}:{seq}" if victim and how not in ("exit_after_layer", "kill_after_setup") else None
    )
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, mode=mode, timeout_s=3.0)
    dist.barrier()
    if victim and how == "kill_after_setup":
        os.kill(os.getpid(), signal.SIGKILL)

    def on_layer(done: int) -> None:
        if victim and how == "exit_after_layer" and done == seq:
            os._exit(17)

    outcome: dict[str, Any] = {
        "peer": None,
        "layer": None,
        "committed": None,
        **_outcome(
            lambda: eplb_xfer.rearrange_expert_weights_inplace(
                old, new, weights, buffer, None, comm, on_layer=on_layer
            )
        ),
    }
    committed = outcome["committed"] if outcome["committed"] is not None else list(range(layers))
    counters = comm.counters
    try:
        eplb_xfer.rearrange_expert_weights_inplace(old, new, weights, buffer, None, comm)
        reuse = "no error"
    except RuntimeError as e:  # TransferError included
        reuse = f"{type(e).__name__}: {e}"
    t1 = time.monotonic()
    comm.close()
    outcome.update(
        close_s=time.monotonic() - t1,
        errors=check(MIXED, weights, old, new, rank, world, layers=committed),
        untouched=set(unchanged(weights, snap)) >= set(range(layers)) - set(committed),
        requests_live=counters["requests_live"],
        failed_peers=counters["failed_peers"],
        agents=_core.live_agents(),
        reuse=reuse,
    )
    return outcome


def corrupt_read(rank: int, world: int, mode: str, reader: int, seq: int):
    """With ``verify=True``, the bytes of the first READ that ``reader``
    completes in exchange ``seq`` are changed after they landed (corrupted in
    flight). Every rank must raise TransferError naming the source; no rank
    commits that layer."""
    n_local, layers = 3, 3
    experts = world * n_local - world
    rng = np.random.default_rng(13)
    from harness import placement

    old = placement(rng, layers, experts, world * n_local)
    new = np.roll(old, n_local, axis=1)
    weights, buffer = build(MIXED, old, rank, world)
    snap = snapshot(weights)
    use_shim(f"corrupt_read:{seq}" if rank == reader else None)
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, mode=mode, timeout_s=10.0, verify=True)
    plan = eplb_xfer.plan_rebalance(old, new, world, node_of_rank=comm.node_of_rank)
    sources = sorted({src for _e, src, _s, _d in plan.recvs(seq - 2, reader)})
    try:
        out: dict[str, Any] = {
            "committed": list(range(layers)),
            **_outcome(
                lambda: eplb_xfer.rearrange_expert_weights_inplace(
                    old, new, weights, buffer, None, comm
                )
            ),
        }
    finally:
        comm.close()
    out["first_source"] = sources[0] if sources else None
    out["errors"] = check(MIXED, weights, old, new, rank, world, layers=out["committed"])
    out["untouched"] = set(unchanged(weights, snap)) >= set(range(layers)) - set(out["committed"])
    return out


# -- soak ----------------------------------------------------------------------------


def soak(rank: int, world: int, mode: str, rounds: int, verify: bool = False, check_every: int = 1):
    """``rounds`` consecutive rebalances through one NixlCommunicator; every
    ``check_every``-th result (and the last) checked byte for byte; the
    counters that must not grow recorded."""
    from harness import placement

    specs = MIXED
    n_local, layers = 4, 3
    slots = world * n_local
    experts = slots - world
    rng = np.random.default_rng(2024)
    first = placement(rng, layers, experts, slots)
    weights, buffer = build(specs, first, rank, world)
    comm = eplb_xfer.NixlCommunicator(
        None, weights, buffer, mode=mode, timeout_s=30.0, verify=verify
    )
    errors: list[str] = []
    seen_requests, seen_lists, buffered_max = set(), set(), 0
    rss_warm = 0
    cur = first
    t0 = time.perf_counter()
    for i in range(rounds):
        nxt = placement(rng, layers, experts, slots)
        eplb_xfer.rearrange_expert_weights_inplace(cur, nxt, weights, buffer, None, comm)
        if (i + 1) % check_every == 0 or i + 1 == rounds:
            errors += check(specs, weights, first, nxt, rank, world)[:3]
        c = comm.counters
        seen_requests.add(int(c["requests_live"]))
        seen_lists.add(int(c["prepared_lists_live"]))
        buffered_max = max(buffered_max, int(c["buffered"]))
        cur = nxt
        if i + 1 == min(20, rounds):
            rss_warm = rss_bytes()
    counters = comm.counters
    comm.close()
    return {
        "errors": errors,
        "requests_live_seen": sorted(seen_requests),
        "prepared_lists_live_seen": sorted(seen_lists),
        "buffered_max": buffered_max,
        "exchanges": counters["exchanges"],
        "rss_warm": rss_warm,
        "rss_end": rss_bytes(),
        "seconds": time.perf_counter() - t0,
    }


def nixl_unloadable(rank: int, world: int, lib_path: str):
    """A missing or foreign library gives NixlUnavailable, not an abort."""
    weights, buffer = build(MIXED, np.array([[0, 1]]), rank, world)
    try:
        eplb_xfer.NixlCommunicator(None, weights, buffer, lib_path=lib_path)
    except eplb_xfer.NixlUnavailable as e:
        return str(e)
    return None


# -- adversarial callers (issue: a core that cannot be crashed or fooled) -----------


def _small(rank: int, world: int, seed: int = 31, layers: int = 3):
    from harness import placement

    n_local = 3
    experts = world * n_local - world
    rng = np.random.default_rng(seed)
    old = placement(rng, layers, experts, world * n_local)
    new = np.roll(old, n_local, axis=1)
    weights, buffer = build(MIXED, old, rank, world)
    return old, new, weights, buffer


def _outcome(fn) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        fn()
        out: dict[str, Any] = {"kind": "ok"}
    except eplb_xfer.TransferError as e:
        out = {"kind": "TransferError", "peer": e.peer, "layer": e.layer,
               "committed": e.committed_layers, "blame": e.blame, "msg": str(e)}  # fmt: skip
    except eplb_xfer.TransferInterrupted as e:
        out = {"kind": "TransferInterrupted", "layer": e.layer, "committed": e.committed_layers}
    except Exception as e:  # noqa: BLE001
        out = {"kind": type(e).__name__, "msg": str(e)}
    out["elapsed"] = time.monotonic() - t0
    return out


def disagree(rank: int, world: int, what: str):
    """Rank 1 calls the driver with a different ``new`` (or ``old``)."""
    old, new, weights, buffer = _small(rank, world)
    snap, bsnap = snapshot(weights), snapshot([buffer])
    if rank == 1:
        if what == "new":
            new = np.roll(new, 1, axis=1)
        else:
            old = old.copy()
            old[0, 0], old[0, 1] = old[0, 1], old[0, 0]
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=10.0)
    out = _outcome(
        lambda: eplb_xfer.rearrange_expert_weights_inplace(old, new, weights, buffer, None, comm)
    )
    comm.close()
    out["weights_untouched"] = len(unchanged(weights, snap)) == len(weights)
    out["buffer_untouched"] = len(unchanged([buffer], bsnap)) == 1
    return out


def vllm_disagree(rank: int, world: int):
    """vLLM style: rank 0 expects an expert from rank 1 that rank 1 was not
    told to send (the ranks disagree on ``new``)."""
    old, _new, weights, buffer = _small(rank, world)
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=10.0)
    snap = snapshot([buffer])

    def run() -> None:
        comm.set_transfer_context(old[0], 0)
        if rank == 0:
            n = old.shape[1] // world
            e = int(next(x for x in old[0, n : 2 * n] if x >= 0))
            comm.add_recv([b[0] for b in buffer], 1, expert_id=e)
        comm.execute()

    out = _outcome(run)
    comm.close()
    out["buffer_untouched"] = len(unchanged([buffer], snap)) == 1
    return out


def threads_on_one_communicator(rank: int, world: int):
    """Rank 1 enters 1.5 s late. Meanwhile, on rank 0, a second thread tries
    a rebalance on the same communicator (refused at once) and reads the
    counters (answered at once: no lock or GIL held while waiting)."""
    old, new, weights, buffer = _small(rank, world)
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=20.0)
    dist.barrier()
    out: dict[str, Any] = {}
    if rank == 1:
        time.sleep(1.5)
    else:

        def second() -> None:
            time.sleep(0.3)
            out["second"] = _outcome(
                lambda: eplb_xfer.rearrange_expert_weights_inplace(
                    old, new, weights, buffer, None, comm
                )
            )
            t0 = time.monotonic()
            _ = comm.counters
            out["counters_s"] = time.monotonic() - t0
            t0 = time.monotonic()
            _ = [i * i for i in range(1000)]  # Python runs while the first thread waits
            out["python_s"] = time.monotonic() - t0

        threading.Thread(target=second, daemon=True).start()
    out["first"] = _outcome(
        lambda: eplb_xfer.rearrange_expert_weights_inplace(old, new, weights, buffer, None, comm)
    )
    out["errors"] = check(MIXED, weights, old, new, rank, world)
    comm.close()
    return out


def close_from_another_thread(rank: int, world: int):
    """Rank 1 never enters; rank 0's rebalance is waiting when another of its
    threads closes the communicator: rank 0's call fails at once, rank 1
    learns it (it raises naming rank 0 at its next call)."""
    old, new, weights, buffer = _small(rank, world)
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=20.0)
    dist.barrier()
    out: dict[str, Any] = {}
    if rank == 0:

        def closer() -> None:
            time.sleep(0.5)
            t0 = time.monotonic()
            comm.close()
            out["close_s"] = time.monotonic() - t0

        threading.Thread(target=closer, daemon=True).start()
        out["call"] = _outcome(
            lambda: eplb_xfer.rearrange_expert_weights_inplace(
                old, new, weights, buffer, None, comm
            )
        )
        time.sleep(1.0)
    else:
        time.sleep(1.5)
        out["call"] = _outcome(
            lambda: eplb_xfer.rearrange_expert_weights_inplace(
                old, new, weights, buffer, None, comm
            )
        )
        comm.close()
    out["agents"] = _core.live_agents()
    return out


def sigint_during_rebalance(rank: int, world: int, delay_s: float, seed: int):
    """Rank 0 gets SIGINT ``delay_s`` into a rebalance whose layers take a
    while (rank 1 sleeps between layers). Both ranks must agree on the
    committed layers; rank 0 raises TransferInterrupted, rank 1
    TransferError naming rank 0."""
    old, new, weights, buffer = _small(rank, world, seed=seed, layers=4)
    snap = snapshot(weights)
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=20.0)
    dist.barrier()

    def on_layer(layer: int) -> None:
        if rank == 1:
            time.sleep(0.15)

    if rank == 0:
        threading.Timer(delay_s, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    out = _outcome(
        lambda: eplb_xfer.rearrange_expert_weights_inplace(
            old, new, weights, buffer, None, comm, on_layer=on_layer
        )
    )
    committed = out.get("committed", list(range(old.shape[0])))
    out["errors"] = check(MIXED, weights, old, new, rank, world, layers=committed)
    out["untouched"] = set(unchanged(weights, snap)) >= set(range(old.shape[0])) - set(committed)
    comm.close()
    return out


def error_after_validation(rank: int, world: int):
    """vLLM style with verify: on rank 0 the checksum computation fails
    (after validation, as a torch error would). Rank 0 raises it; rank 1
    learns at once and raises TransferError naming rank 0 (no timeout)."""
    import eplb_xfer.nixl as nixl_mod

    old, new, weights, buffer = _small(rank, world)
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=30.0, verify=True)
    if rank == 0:

        def boom(*a: Any, **k: Any) -> Any:
            raise RuntimeError("simulated device failure")

        nixl_mod.expert_checksums = boom  # type: ignore[assignment]

    def run() -> None:
        for layer in range(old.shape[0]):
            moves = vllm_move_layer(
                comm, weights[layer], buffer, old[layer], new[layer], layer, rank, world
            )
            vllm_commit(weights[layer], buffer, moves, new[layer], rank, world)

    out = _outcome(run)
    comm.close()
    return out


def late_arrival(rank: int, world: int):
    """Rank 0 fails right away (an error after validation); rank 2 arrives
    2 s later and must fail at once, not after its own 20 s deadline."""
    old, new, weights, buffer = _small(rank, world)
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=20.0)
    dist.barrier()
    if rank == 0:
        comm._live("abort").abort_local("error")  # as the vLLM path does on a torch error
        out: dict[str, Any] = {"kind": "aborted"}
    else:
        if rank == 2:
            time.sleep(2.0)
        out = _outcome(
            lambda: eplb_xfer.rearrange_expert_weights_inplace(
                old, new, weights, buffer, None, comm
            )
        )
    time.sleep(0.5)
    comm.close()
    return out


def fork_child_leaves_parent_alone(rank: int, world: int):
    """After set-up, the process forks; the child drops and closes its copy of
    the communicator and exits. The parent's communicator must keep working."""
    import gc

    old, new, weights, buffer = _small(rank, world)
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=20.0)
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            try:
                comm.counters  # noqa: B018 - must refuse in the child, not touch UCX
                code = 3
            except RuntimeError:
                pass
            comm.close()
            del comm
            gc.collect()
        except BaseException:  # noqa: BLE001
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    out = _outcome(
        lambda: eplb_xfer.rearrange_expert_weights_inplace(old, new, weights, buffer, None, comm)
    )
    out["child_status"] = os.waitstatus_to_exitcode(status)
    out["errors"] = check(MIXED, weights, old, new, rank, world)
    comm.close()
    out["agents"] = _core.live_agents()
    return out


def reallocated_tensor(rank: int, world: int):
    """A registered weight tensor is resized after set-up: the next
    rebalance refuses it (ValueError naming it), nothing moves."""
    old, new, weights, buffer = _small(rank, world)
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=20.0)
    keep = weights[1][0].clone()
    weights[1][0].set_(keep.reshape(-1).clone().reshape(keep.shape))  # new storage, same shape
    out = _outcome(
        lambda: eplb_xfer.rearrange_expert_weights_inplace(old, new, weights, buffer, None, comm)
    )
    comm.close()
    return out


def set_up_under(rank: int, world: int, direction: str):
    """Set-up and one rebalance under the UCX settings of the test's env."""
    old, new, _e = scenario(1, world, 2, 3)
    weights, buffer = build(MIXED, old, rank, world)
    snap = snapshot([buffer])
    out = _outcome(lambda: _set_up_and_run(old, new, weights, buffer, direction))
    out["agents"] = _core.live_agents()
    out["buffer_untouched"] = len(unchanged([buffer], snap)) == 1
    out["errors"] = check(MIXED, weights, old, new, rank, world) if out["kind"] == "ok" else []
    return out


def _set_up_and_run(old, new, weights, buffer, direction: str) -> None:
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=5.0, direction=direction)
    try:
        eplb_xfer.rearrange_expert_weights_inplace(old, new, weights, buffer, None, comm)
    finally:
        comm.close()


def vllm_peer_dies_after_last_layer(rank: int, world: int):
    """vLLM's sequence (no closing handshake): the DONE of rank 2 for the last
    layer reaches rank 0 only, then rank 2 exits. Every survivor's last
    execute() returns (the layer completed everywhere) and the next call
    raises TransferError naming rank 2 on every survivor."""
    old, new, weights, buffer = _small(rank, world)
    layers = old.shape[0]
    use_shim(
        f"exit_mid_done:{layers}" if rank == 2 else None
    )  # vLLM style: exchange n = layer n - 1
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=3.0)

    def rebalance() -> None:
        for layer in range(layers):
            moves = vllm_move_layer(
                comm, weights[layer], buffer, old[layer], new[layer], layer, rank, world
            )
            vllm_commit(weights[layer], buffer, moves, new[layer], rank, world)

    def next_call() -> None:
        comm.set_transfer_context(new[0], 0)
        comm.execute()

    first = _outcome(rebalance)
    first["errors"] = check(MIXED, weights, old, new, rank, world)
    second = _outcome(next_call)
    comm.close()
    return {"first": first, "second": second}


def dropped_communicator(rank: int, world: int):
    """vLLM never closes its communicator: dropping it releases the agent, and
    a process that exits with one still open exits promptly."""
    import gc

    old, new, weights, buffer = _small(rank, world)
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=10.0)
    eplb_xfer.rearrange_expert_weights_inplace(old, new, weights, buffer, None, comm)
    t0 = time.monotonic()
    del comm
    gc.collect()
    dropped_s = time.monotonic() - t0
    agents_after_drop = _core.live_agents()
    # and one left open for the interpreter's exit (the atexit hook closes it)
    globals()["_left_open"] = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=10.0)
    return {"dropped_s": dropped_s, "agents_after_drop": agents_after_drop}
