"""GPU check: two processes on one GPU, DeepSeek-V3 FP8 expert shapes.

Three parts, every byte verified on the device:

* ``modes``: 4 layers x 16 slots per rank, half of the slots change;
  rebalance GB/s for NIXL zero-copy, staged and zero-copy with
  ``verify=True`` (checksums on the GPU), cold (first rebalance of a new
  communicator) and warm (the next ones), next to a device copy of the
  same bytes.
* ``async``: vLLM's async EPLB sequence (a background thread moves one layer
  at a time on a side stream, ``set_stream``; vLLM's own sender/receiver
  choice and commit) while the main thread keeps a matmul loop running on
  the default stream; matmul throughput during the rebalance vs alone.
* ``scale``: DeepSeek-V3 scale, 58 layers x 16 slots per rank (about 41 GB of
  weights per process), zero-copy: GB/s per rank, a device copy of the same
  bytes, and the extra device memory the communicator takes.

    python benches/gpu_check.py --out gpu.json

On a CPU-only machine, ``--device cpu --scale 16 --scale-layers 4`` runs the
same script small.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # vLLM's driver logic as the tests state it

W13, S13, W2, S2 = (4096, 7168), (32, 56), (7168, 2048), (56, 16)


def specs(scale: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    def sc(shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(max(1, d // scale) for d in shape)

    return [
        (torch.uint8, sc(W13)),
        (torch.float32, sc(S13)),
        (torch.uint8, sc(W2)),
        (torch.float32, sc(S2)),
    ]


def fill(row: torch.Tensor, layer: int, t: int, expert: int) -> None:
    """Row bytes that identify (layer, tensor, expert), computed on device."""
    b = row.reshape(-1).view(torch.uint8)
    idx = torch.arange(b.numel(), device=b.device, dtype=torch.int32)
    b.copy_(((idx * (2 * expert + 1) + layer * 7 + t * 13 + expert) % 251).to(torch.uint8))


def placements(
    world: int, n_local: int, layers: int, seed: int, steps: int = 1
) -> list[np.ndarray]:
    """A chain of placements: the first holds experts 0..P-1 in order; in each
    next one, half of every rank's slots take experts the next rank held in
    the previous one (every rank receives n_local/2 rows per layer)."""
    num_slots = world * n_local
    chain = [np.tile(np.arange(num_slots), (layers, 1))]
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        prev = chain[-1]
        nxt = prev.copy()
        for layer in range(layers):
            for r in range(world):
                src = (r + 1) % world
                rows = rng.choice(n_local, size=n_local // 2, replace=False)
                donors = rng.choice(n_local, size=n_local // 2, replace=False)
                nxt[layer, r * n_local + rows] = prev[layer, src * n_local + donors]
        chain.append(nxt)
    return chain


def build(sp, old, rank, n_local, device) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    layers = old.shape[0]
    weights = [
        [torch.empty((n_local, *s), dtype=d, device=device) for d, s in sp] for _ in range(layers)
    ]
    for layer in range(layers):
        for t, w in enumerate(weights[layer]):
            for r in range(n_local):
                fill(w[r], layer, t, int(old[layer, rank * n_local + r]))
    buffer = [torch.empty((n_local, *s), dtype=d, device=device) for d, s in sp]
    return weights, buffer


def bad_rows(weights, placement, rank, n_local) -> int:
    bad = 0
    ref: dict[tuple[int, ...], torch.Tensor] = {}
    for layer in range(placement.shape[0]):
        for t, w in enumerate(weights[layer]):
            for r in range(n_local):
                key = tuple(w[r].shape)
                buf = ref.setdefault(key, torch.empty_like(w[r]))
                fill(buf, layer, t, int(placement[layer, rank * n_local + r]))
                bad += int(not torch.equal(buf, w[r]))
    return bad


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_copy_gbps(nbytes: int, device: torch.device) -> float:
    """A device copy of ``nbytes`` (GB/s of bytes moved, like the rebalance)."""
    chunk = min(nbytes, 8 << 30)
    src = torch.empty(chunk, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    done = 0
    while done < nbytes:
        dst.copy_(src)
        done += chunk
    sync(device)
    secs = time.perf_counter() - t0
    del src, dst
    return done / secs / 1e9


def timed_rebalances(comm, chain, weights, buffer, rank, n_local, device, runs) -> None:
    """One verified rebalance per step of ``chain`` (the first cold, then warm),
    each appended to ``runs`` (so a failure keeps what ran before it)."""
    import eplb_xfer

    for cur, nxt in zip(chain, chain[1:]):
        torch.distributed.barrier()
        sync(device)
        t0 = time.perf_counter()
        stats = eplb_xfer.rearrange_expert_weights_inplace(cur, nxt, weights, buffer, None, comm)
        sync(device)
        secs = time.perf_counter() - t0
        runs.append(
            {
                "seconds": secs,
                "bytes_received": stats.bytes_received,
                "gbps": stats.bytes_received / secs / 1e9,
                "layer_ms": [round(x * 1e3, 3) for x in stats.layer_seconds],
                "bad_rows": bad_rows(weights, nxt, rank, n_local),
            }
        )


def part_modes(rank, world, args, device) -> dict[str, Any]:
    import eplb_xfer

    sp = specs(args.scale)
    n_local, layers = args.slots, args.layers
    chain = placements(world, n_local, layers, args.seed, args.repeats)
    out: dict[str, Any] = {}
    for mode in args.modes:
        weights, buffer = build(sp, chain[0], rank, n_local, device)
        base, _, extra = mode.partition("+")
        if base == "torch":
            try:
                comm: Any = eplb_xfer.create_communicator("torch", None, weights, buffer)
            except Exception as e:  # noqa: BLE001
                out[mode] = {"error": f"{type(e).__name__}: {e}"}
                continue
        else:
            comm = eplb_xfer.create_communicator(
                "nixl", None, weights, buffer, mode=base, timeout_s=120.0, verify=extra == "verify"
            )
        runs: list[dict[str, Any]] = []
        try:
            timed_rebalances(comm, chain, weights, buffer, rank, n_local, device, runs)
            out[mode] = {"runs": runs, "staging_bytes": comm.staging_bytes}
        except Exception as e:  # noqa: BLE001 - reported, the other parts still run
            out[mode] = {"error": f"{type(e).__name__}: {e}", "runs": runs}
        finally:
            comm.close()
            del weights, buffer
    total = next((m["runs"][0]["bytes_received"] for m in out.values() if m.get("runs")), 0)
    out["device_copy_gbps"] = device_copy_gbps(max(total, 1 << 20), device)
    return out


def part_async(rank, world, args, device) -> dict[str, Any]:
    """vLLM's async sequence on a side stream while matmuls run on the default one."""
    from harness import vllm_commit, vllm_move_layer

    import eplb_xfer

    sp = specs(args.scale)
    n_local, layers = args.slots, args.layers
    old, new = placements(world, n_local, layers, args.seed + 1)[:2]
    weights, buffer = build(sp, old, rank, n_local, device)
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=120.0)
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    n = args.matmul
    a = torch.randn(
        n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    b = torch.randn_like(a)

    def matmuls(seconds: float, stop: threading.Event | None = None) -> float:
        count = 0
        sync(device)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds and not (stop and stop.is_set()):
            for _ in range(8):
                torch.mm(a, b)
            sync(device)
            count += 8
        return count / (time.perf_counter() - t0)

    matmuls(0.5)  # warm
    torch.distributed.barrier()
    alone = matmuls(args.matmul_s)
    torch.distributed.barrier()
    stop = threading.Event()
    failure: list[BaseException] = []
    timing: dict[str, float] = {}

    def worker() -> None:
        try:
            comm.set_stream(side)
            t0 = time.perf_counter()
            for layer in range(layers):
                moves = vllm_move_layer(
                    comm, weights[layer], buffer, old[layer], new[layer], layer, rank, world,
                    stream=side,
                )  # fmt: skip
                with torch.cuda.stream(side) if side is not None else _null():
                    vllm_commit(weights[layer], buffer, moves, new[layer], rank, world)
                if side is not None:
                    side.synchronize()
            timing["rebalance_s"] = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001
            failure.append(e)
        finally:
            stop.set()

    th = threading.Thread(target=worker, daemon=True)
    th.start()
    t0 = time.perf_counter()
    during = matmuls(3600.0, stop)
    th.join()
    out: dict[str, Any] = {
        "matmul_per_s_alone": alone,
        "matmul_per_s_during": during,
        "ratio": during / alone if alone else 0.0,
        "wall_s": time.perf_counter() - t0,
        **timing,
    }
    if failure:
        out["error"] = f"{type(failure[0]).__name__}: {failure[0]}"
    else:
        out["bad_rows"] = bad_rows(weights, new, rank, n_local)
    comm.close()
    return out


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def part_scale(rank, world, args, device) -> dict[str, Any]:
    import eplb_xfer

    sp = specs(args.scale)
    n_local, layers = args.slots, args.scale_layers
    chain = placements(world, n_local, layers, args.seed + 2, 2)
    weights, buffer = build(sp, chain[0], rank, n_local, device)
    expert_bytes = sum(int(np.prod(s)) * torch.empty((), dtype=d).element_size() for d, s in sp)
    sync(device)
    free_before = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    alloc_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    comm = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=300.0)
    setup_s = time.perf_counter() - t0
    sync(device)
    free_after = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    alloc_after = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    runs: list[dict[str, Any]] = []
    try:
        timed_rebalances(comm, chain, weights, buffer, rank, n_local, device, runs)  # cold, warm
    finally:
        comm.close()
    weight_bytes = layers * n_local * expert_bytes
    del weights, buffer
    torch.distributed.barrier()
    return {
        "layers": layers,
        "slots_per_rank": n_local,
        "expert_bytes": expert_bytes,
        "weight_bytes_per_rank": weight_bytes,
        "setup_s": setup_s,
        "extra_device_bytes_torch": alloc_after - alloc_before,
        "extra_device_bytes_seen_by_driver": free_before - free_after,
        "runs": runs,
        "device_copy_gbps": device_copy_gbps(runs[0]["bytes_received"], device) if runs else 0,
    }


def rank_main(rank: int, world: int, args: argparse.Namespace) -> dict[str, Any]:
    device = (
        torch.device(args.device, rank % torch.cuda.device_count())
        if args.device == "cuda"
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    res: dict[str, Any] = {"rank": rank, "device": str(device)}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
    for part in args.parts:
        t0 = time.perf_counter()
        try:
            res[part] = {"modes": part_modes, "async": part_async, "scale": part_scale}[part](
                rank, world, args, device
            )
        except Exception as e:  # noqa: BLE001
            res[part] = {"error": f"{type(e).__name__}: {e}"}
        res[part]["part_s"] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", type=int, default=1, help="divide row dimensions by this")
    p.add_argument("--slots", type=int, default=16, help="slots per rank")
    p.add_argument("--layers", type=int, default=4, help="layers of the modes/async parts")
    p.add_argument("--scale-layers", type=int, default=58, help="layers of the scale part")
    p.add_argument("--repeats", type=int, default=3, help="rebalances per mode (1 cold + warm)")
    p.add_argument("--matmul", type=int, default=8192, help="matmul size of the async part")
    p.add_argument("--matmul-s", type=float, default=3.0, help="seconds of matmuls alone")
    p.add_argument("--seed", type=int, default=0)
    # "torch" (gloo) cannot move CUDA tensors and breaks the group: CPU only
    p.add_argument("--modes", default="zero_copy,staged,zero_copy+verify")
    p.add_argument("--parts", default="modes,async,scale")
    p.add_argument("--timeout", type=float, default=540.0)
    p.add_argument("--out", default="")
    args = p.parse_args()
    args.modes = args.modes.split(",")
    args.parts = args.parts.split(",")
    os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
    from eplb_xfer._spawn import spawn_ranks

    env = {"UCX_WARN_UNUSED_ENV_VARS": "n"}
    res = spawn_ranks(rank_main, 2, args, timeout_s=args.timeout, env=env, allow_failures=True)
    ok = True
    for r in res:
        if isinstance(r, Exception):
            print(f"rank failed: {r}")
            ok = False
            continue
        print(f"== rank {r['rank']} on {r.get('gpu', r['device'])}")
        modes = r.get("modes", {})
        for mode, m in modes.items():
            if not isinstance(m, dict):
                continue
            if "error" in m:
                print(f"  {mode:<18} error: {m['error']}")
            for i, run in enumerate(m.get("runs", [])):
                tag = "cold" if i == 0 else "warm"
                gb, secs = run["bytes_received"] / 1e9, run["seconds"]
                print(
                    f"  {mode:<18} {tag} {gb:8.3f} GB {secs:8.4f} s {run['gbps']:9.1f} GB/s"
                    f"  staging {m.get('staging_bytes', 0):,} B  bad {run['bad_rows']}"
                    f"  layers ms {run.get('layer_ms')}"
                )
                ok &= run["bad_rows"] == 0
        if "device_copy_gbps" in modes:
            print(f"  device copy of the same bytes: {modes['device_copy_gbps']:.1f} GB/s")
        a = r.get("async", {})
        if a:
            print(f"  async: {a}")
            ok &= a.get("bad_rows", 1) == 0
        s = r.get("scale", {})
        if s:
            runs = s.get("runs", [])
            for i, run in enumerate(runs):
                tag = "cold" if i == 0 else "warm"
                gb, secs = run["bytes_received"] / 1e9, run["seconds"]
                print(
                    f"  scale {s['layers']}x{s['slots_per_rank']} "
                    f"({s['weight_bytes_per_rank'] / 1e9:.1f} GB/rank) {tag}: {gb:.2f} GB in "
                    f"{secs:.3f} s = {run['gbps']:.1f} GB/s, bad {run['bad_rows']}"
                )
                ok &= run["bad_rows"] == 0
            if "error" in s:
                print(f"  scale error: {s['error']}")
                ok = False
            else:
                print(
                    f"  scale: device copy {s['device_copy_gbps']:.1f} GB/s; "
                    f"set-up {s['setup_s']:.2f} s; "
                    f"extra device memory: torch {s['extra_device_bytes_torch']:,} B, "
                    f"driver-visible {s['extra_device_bytes_seen_by_driver']:,} B"
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump([r if not isinstance(r, Exception) else str(r) for r in res], f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
