"""GPU check: two processes on one GPU, DeepSeek-V3 FP8 expert shapes.

4 layers of 16 slots per rank, half of the slots change; every byte verified.
Reports rebalance GB/s for NIXL zero-copy, staged and zero-copy with
verify=True (checksums computed by torch on the GPU) next to torch's
device-to-device copy of the same bytes. Writes JSON to --out.

    UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y python benches/gpu_check.py --out gpu.json

On a CPU-only machine, ``--device cpu --scale 16`` runs the same script small.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

W13, S13, W2, S2 = (4096, 7168), (32, 56), (7168, 2048), (56, 16)


def specs(scale: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    def sc(shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(max(1, d // scale) for d in shape)

    return [
        ("w13", torch.uint8, sc(W13)),
        ("s13", torch.float32, sc(S13)),
        ("w2", torch.uint8, sc(W2)),
        ("s2", torch.float32, sc(S2)),
    ]


def fill(row: torch.Tensor, layer: int, t: int, expert: int) -> None:
    """Row bytes that identify (layer, tensor, expert), computed on device."""
    b = row.reshape(-1).view(torch.uint8)
    idx = torch.arange(b.numel(), device=b.device, dtype=torch.int32)
    b.copy_(((idx * (2 * expert + 1) + layer * 7 + t * 13 + expert) % 251).to(torch.uint8))


def placements(world: int, n_local: int, layers: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """old: experts 0..P-1 in order; new: half of each rank's slots take
    experts from the next rank (so every rank reads n_local/2 rows per layer)."""
    num_slots = world * n_local
    old = np.tile(np.arange(num_slots), (layers, 1))
    new = old.copy()
    rng = np.random.default_rng(seed)
    for layer in range(layers):
        for r in range(world):
            src = (r + 1) % world
            rows = rng.choice(n_local, size=n_local // 2, replace=False)
            donors = rng.choice(n_local, size=n_local // 2, replace=False)
            new[layer, r * n_local + rows] = old[layer, src * n_local + donors]
    return old, new


def rank_main(rank: int, world: int, args: argparse.Namespace) -> dict:
    import eplb_xfer

    device = (
        torch.device(args.device, rank % torch.cuda.device_count())
        if args.device == "cuda"
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sp = specs(args.scale)
    n_local, L = args.slots, args.layers
    old, new = placements(world, n_local, L, args.seed)
    results: dict = {"rank": rank, "device": str(device), "modes": {}}
    row_bytes = sum(int(np.prod(s)) * torch.empty((), dtype=d).element_size() for _, d, s in sp)
    results["expert_bytes"] = row_bytes
    for mode in args.modes:
        weights = [
            [torch.empty((n_local, *s), dtype=d, device=device) for _, d, s in sp] for _ in range(L)
        ]
        for layer in range(L):
            for t, w in enumerate(weights[layer]):
                for r in range(n_local):
                    fill(w[r], layer, t, int(old[layer, rank * n_local + r]))
        buffer = [torch.empty((n_local, *s), dtype=d, device=device) for _, d, s in sp]
        if mode == "torch":
            comm = eplb_xfer.create_communicator("torch", None, weights, buffer)
        else:  # "zero_copy", "staged", or either with "+verify" (checksums on the GPU)
            base, _, extra = mode.partition("+")
            comm = eplb_xfer.create_communicator(
                "nixl", None, weights, buffer, mode=base, timeout_s=120.0, verify=extra == "verify"
            )
        staging = comm.staging_bytes
        torch.distributed.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = eplb_xfer.rearrange_expert_weights_inplace(old, new, weights, buffer, None, comm)
        secs = time.perf_counter() - t0
        comm.close()
        bad = 0
        for layer in range(L):
            for t, w in enumerate(weights[layer]):
                for r in range(n_local):
                    ref = torch.empty_like(w[r])
                    fill(ref, layer, t, int(new[layer, rank * n_local + r]))
                    bad += int(not torch.equal(ref, w[r]))
        results["modes"][mode] = {
            "seconds": secs,
            "bytes_received": stats.bytes_received,
            "gbps": stats.bytes_received / secs / 1e9,
            "staging_bytes": staging,
            "bad_rows": bad,
        }
        del weights, buffer
    # torch device-to-device copy of the same bytes, for scale
    total = results["modes"][args.modes[0]]["bytes_received"]
    if total:
        src = torch.empty(total, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        results["device_copy_gbps"] = 5 * total / (time.perf_counter() - t0) / 1e9
    return results


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", type=int, default=1, help="divide row dimensions by this")
    p.add_argument("--slots", type=int, default=16, help="slots per rank")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="zero_copy,staged,torch,zero_copy+verify")
    p.add_argument("--out", default="")
    args = p.parse_args()
    args.modes = args.modes.split(",")
    os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
    from eplb_xfer._spawn import spawn_ranks

    env = {"UCX_WARN_UNUSED_ENV_VARS": "n"}
    res = spawn_ranks(rank_main, 2, args, timeout_s=540, env=env)
    print(f"device: {res[0]['device']}  expert bytes: {res[0]['expert_bytes']:,}")
    print(f"{'mode':<16} {'rank':>4} {'GB recv':>8} {'seconds':>8} {'GB/s':>8} {'staging':>12} bad")
    for r in res:
        for mode, m in r["modes"].items():
            print(
                f"{mode:<16} {r['rank']:>4} {m['bytes_received'] / 1e9:>8.3f} "
                f"{m['seconds']:>8.3f} {m['gbps']:>8.2f} {m['staging_bytes']:>12,} {m['bad_rows']}"
            )
    for r in res:
        if "device_copy_gbps" in r:
            print(
                f"rank {r['rank']}: torch device copy of the same bytes: "
                f"{r['device_copy_gbps']:.1f} GB/s"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if all(m["bad_rows"] == 0 for r in res for m in r["modes"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
