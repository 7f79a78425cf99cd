"""An independent list of malformed calls against the public API.

Each case is ``(name, exception type, text the message must contain, call)``;
``call(ctx)`` makes one bad call. :func:`run_all` runs every case on each rank
of a 2-rank world holding a zero-copy and a staged NixlCommunicator and a
TorchCommunicator, checking after each case that no tensor changed, then
proves every communicator still works with a real rebalance.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from harness import MIXED, build, check, scenario, snapshot, unchanged

import eplb_xfer


@dataclass
class Ctx:
    rank: int
    world: int
    old: np.ndarray
    new: np.ndarray
    weights: list[list[torch.Tensor]]
    buffer: list[torch.Tensor]
    nixl: eplb_xfer.NixlCommunicator
    staged: eplb_xfer.NixlCommunicator
    torch_comm: eplb_xfer.TorchCommunicator
    closed_nixl: eplb_xfer.NixlCommunicator
    closed_torch: eplb_xfer.TorchCommunicator

    @property
    def n_local(self) -> int:
        return self.old.shape[1] // self.world

    def mine(self, layer: int = 0) -> list[int]:
        """Experts this rank holds in ``old`` at ``layer``."""
        lo = self.rank * self.n_local
        return [int(e) for e in self.old[layer, lo : lo + self.n_local] if e >= 0]

    def theirs(self, layer: int = 0) -> tuple[int, int]:
        """(peer rank, an expert it holds at ``layer``)."""
        peer = (self.rank + 1) % self.world
        lo = peer * self.n_local
        return peer, int(next(e for e in self.old[layer, lo : lo + self.n_local] if e >= 0))

    def run(self, old: Any = None, new: Any = None, **kw: Any) -> Any:
        args: dict[str, Any] = {
            "old_indices": self.old if old is None else old,
            "new_indices": self.new if new is None else new,
            "expert_weights": self.weights,
            "expert_buffer": self.buffer,
            "group": None,
            "communicator": self.nixl,
        }
        args.update(kw)
        return eplb_xfer.rearrange_expert_weights_inplace(**args)


def _with(a: np.ndarray, idx: tuple[int, int], value: int) -> np.ndarray:
    b = a.copy()
    b[idx] = value
    return b


def _layer(ctx: Ctx, layer: int, t: int, value: Any) -> list[list[Any]]:
    w: list[list[Any]] = [list(lw) for lw in ctx.weights]
    w[layer][t] = value
    return w


def _buf(ctx: Ctx, t: int, value: Any) -> list[Any]:
    b: list[Any] = list(ctx.buffer)
    b[t] = value
    return b


def _rows(ts: list[torch.Tensor], r: int) -> list[torch.Tensor]:
    return [t[r] for t in ts]


def _ctx_then_execute(comm: eplb_xfer.EplbCommunicator, ctx: Ctx, fn: Callable[[], None]) -> None:
    comm.set_transfer_context(ctx.old, 0)
    fn()
    comm.execute()


Case = tuple[str, type[BaseException], str, Callable[[Ctx], Any]]

CASES: list[Case] = [
    # -- placements (rearrange_expert_weights_inplace) -------------------------------
    ("old_1d", ValueError, "old_indices", lambda c: c.run(old=c.old[0])),
    ("old_3d", ValueError, "old_indices", lambda c: c.run(old=c.old[None])),
    ("old_float", TypeError, "old_indices", lambda c: c.run(old=c.old.astype(np.float32))),
    ("old_bool_tensor", TypeError, "old_indices", lambda c: c.run(old=torch.ones(2, 6).bool())),
    ("old_strings", TypeError, "old_indices", lambda c: c.run(old=np.full(c.old.shape, "x"))),
    ("old_not_array", TypeError, "old_indices", lambda c: c.run(old="0 1 2")),
    ("old_below_minus_1", ValueError, "old_indices", lambda c: c.run(old=_with(c.old, (0, 0), -2))),
    ("new_below_minus_1", ValueError, "new_indices", lambda c: c.run(new=_with(c.new, (1, 3), -7))),
    ("new_float_tensor", TypeError, "new_indices", lambda c: c.run(new=torch.zeros(2, 6))),
    ("new_fewer_slots", ValueError, "new_indices", lambda c: c.run(new=c.new[:, :-1])),
    ("new_fewer_layers", ValueError, "new_indices", lambda c: c.run(new=c.new[:1])),
    (
        "slots_not_split_over_ranks",
        ValueError,
        "old_indices",
        lambda c: c.run(old=c.old[:, :-1], new=c.new[:, :-1]),
    ),
    (
        "new_expert_held_nowhere",
        ValueError,
        "new_indices",
        lambda c: c.run(new=_with(c.new, (1, 0), 9999)),
    ),
    # -- weights and buffer ---------------------------------------------------------
    (
        "weights_fewer_layers",
        ValueError,
        "expert_weights",
        lambda c: c.run(expert_weights=c.weights[:1]),
    ),
    ("weights_a_tensor", TypeError, "expert_weights", lambda c: c.run(expert_weights=c.buffer[0])),
    (
        "weights_layer_a_tensor",
        TypeError,
        "expert_weights[1]",
        lambda c: c.run(expert_weights=[c.weights[0], c.buffer[0]]),
    ),
    (
        "weights_layer_fewer_tensors",
        ValueError,
        "expert_weights[1]",
        lambda c: c.run(expert_weights=[c.weights[0], c.weights[1][:3]]),
    ),
    (
        "weights_not_tensor",
        TypeError,
        "expert_weights[0][1]",
        lambda c: c.run(expert_weights=_layer(c, 0, 1, "w")),
    ),
    (
        "weights_wrong_dtype",
        ValueError,
        "expert_weights[1][1]",
        lambda c: c.run(expert_weights=_layer(c, 1, 1, c.weights[1][1].to(torch.float64))),
    ),
    (
        "weights_wrong_row_shape",
        ValueError,
        "expert_weights[0][0]",
        lambda c: c.run(expert_weights=_layer(c, 0, 0, c.weights[0][0][:, :-1].contiguous())),
    ),
    (
        "weights_rows_not_contiguous",
        ValueError,
        "expert_weights[0][0]",
        lambda c: c.run(
            expert_weights=_layer(
                c, 0, 0, c.weights[0][0].transpose(1, 2).contiguous().transpose(1, 2)
            )
        ),
    ),
    (
        "weights_other_device",
        ValueError,
        "expert_weights[1][2]",
        lambda c: c.run(expert_weights=_layer(c, 1, 2, c.weights[1][2].to("meta"))),
    ),
    (
        "weights_more_rows_than_placement",
        ValueError,
        "n_local",
        lambda c: c.run(
            expert_weights=[[torch.cat([t, t[:1]]) for t in lw] for lw in c.weights],
            expert_buffer=[torch.cat([t, t[:1]]) for t in c.buffer],
        ),
    ),
    ("buffer_a_tensor", TypeError, "expert_buffer", lambda c: c.run(expert_buffer=c.buffer[0])),
    ("buffer_empty", ValueError, "expert_buffer", lambda c: c.run(expert_buffer=[])),
    (
        "buffer_fewer_tensors",
        ValueError,
        "expert_buffer",
        lambda c: c.run(expert_buffer=c.buffer[:2]),
    ),
    (
        "buffer_rows",
        ValueError,
        "expert_buffer",
        lambda c: c.run(
            expert_buffer=_buf(c, 3, torch.empty(c.n_local + 1, 12, 4, dtype=torch.uint8))
        ),
    ),
    (
        "buffer_not_tensor",
        TypeError,
        "expert_buffer[0]",
        lambda c: c.run(expert_buffer=[None, *c.buffer[1:]]),
    ),
    (
        "weights_not_registered",
        ValueError,
        "expert_weights",
        lambda c: c.run(expert_weights=[[t.clone() for t in lw] for lw in c.weights]),
    ),
    (
        "buffer_not_registered",
        ValueError,
        "expert_buffer",
        lambda c: c.run(expert_buffer=[t.clone() for t in c.buffer]),
    ),
    # -- other driver arguments -----------------------------------------------------
    ("communicator_wrong_type", TypeError, "communicator", lambda c: c.run(communicator="nixl")),
    ("group_wrong_type", TypeError, "group", lambda c: c.run(group=3)),
    ("node_of_rank_short", ValueError, "node_of_rank", lambda c: c.run(node_of_rank=[0])),
    ("node_of_rank_negative", ValueError, "node_of_rank", lambda c: c.run(node_of_rank=[0, -1])),
    ("closed_communicator", RuntimeError, "closed", lambda c: c.run(communicator=c.closed_nixl)),
    (
        "closed_torch_communicator",
        RuntimeError,
        "closed",
        lambda c: c.run(communicator=c.closed_torch),
    ),
    # -- plan_rebalance ---------------------------------------------------------------
    (
        "plan_ep_size_zero",
        ValueError,
        "ep_size",
        lambda c: eplb_xfer.plan_rebalance(c.old, c.new, 0),
    ),
    (
        "plan_ep_size_bool",
        TypeError,
        "ep_size",
        lambda c: eplb_xfer.plan_rebalance(c.old, c.new, True),
    ),
    (
        "plan_ep_size_not_dividing",
        ValueError,
        "ep_size",
        lambda c: eplb_xfer.plan_rebalance(c.old, c.new, 4),
    ),
    (
        "plan_shapes_differ",
        ValueError,
        "new_indices",
        lambda c: eplb_xfer.plan_rebalance(c.old, c.new[:1], 2),
    ),
    # -- create_communicator options --------------------------------------------------
    (
        "backend_unknown",
        ValueError,
        "backend",
        lambda c: eplb_xfer.create_communicator("pigeon", None, c.weights, c.buffer),
    ),
    (
        "mode_unknown",
        ValueError,
        "mode",
        lambda c: eplb_xfer.create_communicator("nixl", None, c.weights, c.buffer, mode="fast"),
    ),
    *[
        (
            f"timeout_s_{name}",
            ValueError,
            "timeout_s",
            lambda c, v=v: eplb_xfer.create_communicator(
                "nixl", None, c.weights, c.buffer, timeout_s=v
            ),
        )
        for name, v in [
            ("zero", 0),
            ("negative", -1.0),
            ("nan", float("nan")),
            ("inf", float("inf")),
            ("huge", 1e20),
            ("maxsize", sys.maxsize),
        ]
    ],
    *[
        (
            f"timeout_s_{name}",
            TypeError,
            "timeout_s",
            lambda c, v=v: eplb_xfer.create_communicator(
                "nixl", None, c.weights, c.buffer, timeout_s=v
            ),
        )
        for name, v in [("str", "5"), ("bool", True), ("none", None)]
    ],
    (
        "verify_not_bool",
        TypeError,
        "verify",
        lambda c: eplb_xfer.create_communicator("nixl", None, c.weights, c.buffer, verify="yes"),
    ),
    (
        "nixl_unknown_option",
        TypeError,
        "colour",
        lambda c: eplb_xfer.create_communicator("nixl", None, c.weights, c.buffer, colour="red"),
    ),
    (
        "torch_with_options",
        TypeError,
        "options",
        lambda c: eplb_xfer.create_communicator("torch", None, c.weights, c.buffer, mode="staged"),
    ),
    # -- communicator calls (NIXL, zero-copy unless named) ----------------------------
    (
        "add_send_dst_rank_high",
        ValueError,
        "dst_rank",
        lambda c: c.nixl.add_send(_rows(c.weights[0], 0), 2, 1),
    ),
    (
        "add_send_dst_rank_str",
        TypeError,
        "dst_rank",
        lambda c: c.nixl.add_send(_rows(c.weights[0], 0), "1", 1),
    ),
    (
        "add_recv_src_rank_negative",
        ValueError,
        "src_rank",
        lambda c: c.nixl.add_recv(_rows(c.buffer, 0), -1, 1),
    ),
    (
        "add_recv_expert_negative",
        ValueError,
        "expert_id",
        lambda c: c.nixl.add_recv(_rows(c.buffer, 0), 0, -1),
    ),
    (
        "add_send_expert_float",
        TypeError,
        "expert_id",
        lambda c: c.nixl.add_send(_rows(c.weights[0], 0), 0, 1.0),
    ),
    (
        "add_recv_too_few_tensors",
        ValueError,
        "tensors",
        lambda c: c.nixl.add_recv(_rows(c.buffer, 0)[:3], 0, 1),
    ),
    (
        "add_recv_wrong_row_size",
        ValueError,
        "tensors[0]",
        lambda c: c.nixl.add_recv([c.buffer[0][0, :-1], *_rows(c.buffer, 0)[1:]], 0, 1),
    ),
    (
        "add_recv_not_tensor",
        TypeError,
        "tensors[1]",
        lambda c: c.nixl.add_recv([c.buffer[0][0], 7, 8, 9], 0, 1),
    ),
    (
        "add_recv_requires_grad",
        ValueError,
        "requires_grad",
        lambda c: c.nixl.add_recv(
            [
                c.buffer[0][0],
                torch.zeros(2, 3).requires_grad_(),
                c.buffer[2][0],
                c.buffer[3][0],
            ],
            0,
            1,
        ),
    ),
    (
        "add_recv_meta_tensor",
        ValueError,
        "tensors[0]",
        lambda c: c.nixl.add_recv([c.buffer[0][0].to("meta"), *_rows(c.buffer, 0)[1:]], 0, 1),
    ),
    (
        "add_send_uint64_expert_that_wraps",
        ValueError,
        "expert_id",
        lambda c: c.nixl.add_send(_rows(c.weights[0], 0), 0, np.uint64(2**64 - 1)),
    ),
    ("execute_without_context", ValueError, "old_indices", lambda c: c.nixl.execute()),
    (
        "set_context_layer_negative",
        ValueError,
        "layer_idx",
        lambda c: c.nixl.set_transfer_context(c.old, -1),
    ),
    (
        "set_context_layer_too_big",
        ValueError,
        "layer_idx",
        lambda c: c.nixl.set_transfer_context(c.old, 2),
    ),
    (
        "set_context_layer_str",
        TypeError,
        "layer_idx",
        lambda c: c.nixl.set_transfer_context(c.old, "0"),
    ),
    (
        "set_context_float_indices",
        TypeError,
        "old_indices",
        lambda c: c.nixl.set_transfer_context(c.old * 1.0, 0),
    ),
    (
        "execute_old_wrong_slots",
        ValueError,
        "old_indices",
        lambda c: (
            c.nixl.set_transfer_context(c.old, 0),
            c.nixl.execute(old_indices=c.old[0, :-2]),
        ),
    ),
    (
        "execute_recv_expert_not_at_source",
        ValueError,
        "expert_id",
        lambda c: _ctx_then_execute(
            c.nixl, c, lambda: c.nixl.add_recv(_rows(c.buffer, 0), c.theirs()[0], 9999)
        ),
    ),
    (
        "execute_send_expert_not_held",
        ValueError,
        "expert_id",
        lambda c: _ctx_then_execute(
            c.staged, c, lambda: c.staged.add_send(_rows(c.weights[0], 0), c.theirs()[0], 9999)
        ),
    ),
    (
        "execute_zero_copy_send_not_weight_row",
        ValueError,
        "tensors",
        lambda c: _ctx_then_execute(
            c.nixl, c, lambda: c.nixl.add_send(_rows(c.buffer, 0), c.theirs()[0], c.mine()[0])
        ),
    ),
    (
        "staged_execute_old_wrong_slots",
        ValueError,
        "old_indices",
        lambda c: c.staged.execute(old_indices=c.old[0, :-1]),
    ),
    (
        "rebalance_layer_out_of_range",
        ValueError,
        "layer_idx",
        lambda c: c.nixl.rebalance_layer(
            eplb_xfer.plan_rebalance(c.old, c.new, c.world), 5, c.weights[0], c.buffer, c.old[0]
        ),
    ),
    (
        "rebalance_layer_plan_of_another_shape",
        ValueError,
        "plan",
        lambda c: c.nixl.rebalance_layer(
            eplb_xfer.plan_rebalance(
                np.concatenate([c.old, c.old], axis=1), np.concatenate([c.new, c.new], axis=1), 2
            ),
            0,
            c.weights[0],
            c.buffer,
            c.old[0],
        ),
    ),
    (
        "set_context_row_too_short",
        ValueError,
        "old_indices",
        lambda c: c.nixl.set_transfer_context(c.old[0, :-1], 0),
    ),
    (
        "torch_set_context_layer_too_big",
        ValueError,
        "layer_idx",
        lambda c: c.torch_comm.set_transfer_context(c.old[0], 7),
    ),
    (
        "torch_set_context_row_too_long",
        ValueError,
        "old_indices",
        lambda c: c.torch_comm.set_transfer_context(np.zeros(99, dtype=np.int64), 0),
    ),
    (
        "set_stream_not_a_stream",
        TypeError,
        "stream",
        lambda c: c.nixl.set_stream("side"),
    ),
    (
        "close_linger_huge",
        ValueError,
        "linger_s",
        lambda c: c.nixl.close(linger_s=1e20),
    ),
    # -- memory shared between rows (aliasing) ------------------------------------------
    (
        # a NIXL communicator names the tensor it did not register
        "weights_layer_listed_twice",
        ValueError,
        "expert_weights[1][0]",
        lambda c: c.run(expert_weights=[c.weights[0], c.weights[0]]),
    ),
    (
        "buffer_is_a_layer",
        ValueError,
        "expert_buffer[0]",
        lambda c: c.run(expert_buffer=c.weights[1]),
    ),
    (
        "torch_backend_buffer_is_a_layer",
        ValueError,
        "shares memory",
        lambda c: c.run(expert_buffer=c.weights[1], communicator=c.torch_comm),
    ),
    (
        "torch_backend_aliased_layers",
        ValueError,
        "shares memory",
        lambda c: c.run(expert_weights=[c.weights[0], c.weights[0]], communicator=c.torch_comm),
    ),
    (
        "nixl_same_tensor_registered_twice",
        ValueError,
        "shares memory",
        lambda c: eplb_xfer.create_communicator(
            "nixl", None, [c.weights[0], c.weights[0]], c.buffer
        ),
    ),
    (
        "nixl_buffer_overlaps_weights",
        ValueError,
        "shares memory",
        lambda c: eplb_xfer.create_communicator(
            "nixl", None, c.weights, [t.view(t.shape) for t in c.weights[0]]
        ),
    ),
    (
        "weights_require_grad",
        ValueError,
        "requires_grad",
        lambda c: eplb_xfer.create_communicator(
            "nixl",
            None,
            [[t.clone().float().requires_grad_() for t in lw[:1]] for lw in c.weights],
            [c.buffer[0].float()],
        ),
    ),
    # -- odd placements and options --------------------------------------------------
    (
        "old_meta_tensor",
        ValueError,
        "old_indices",
        lambda c: c.run(old=torch.zeros(2, 6, dtype=torch.long, device="meta")),
    ),
    ("old_ragged_list", ValueError, "old_indices", lambda c: c.run(old=[[0, 1, 2], [0, 1]])),
    (
        "old_uint64_that_wraps",
        ValueError,
        "old_indices",
        lambda c: c.run(old=c.old.astype(np.uint64) + np.uint64(2**63)),
    ),
    ("node_of_rank_float", TypeError, "node_of_rank", lambda c: c.run(node_of_rank=[0.0, 1.0])),
    ("node_of_rank_huge", ValueError, "node_of_rank", lambda c: c.run(node_of_rank=[0, 2**40])),
    ("node_of_rank_not_list", TypeError, "node_of_rank", lambda c: c.run(node_of_rank=3)),
    ("rank_mapping_not_dict", TypeError, "rank_mapping", lambda c: c.run(rank_mapping=[0, 1])),
    (
        "rank_mapping_bad_keys",
        ValueError,
        "rank_mapping",
        lambda c: c.run(rank_mapping={0: 0, 5: 1}),
    ),
    ("on_layer_not_callable", TypeError, "on_layer", lambda c: c.run(on_layer=3)),
    (
        "direction_unknown",
        ValueError,
        "direction",
        lambda c: eplb_xfer.create_communicator(
            "nixl", None, c.weights, c.buffer, direction="sideways"
        ),
    ),
    (
        "schedule_unknown",
        ValueError,
        "schedule",
        lambda c: eplb_xfer.create_communicator(
            "nixl", None, c.weights, c.buffer, schedule="whenever"
        ),
    ),
    # -- after close ------------------------------------------------------------------
    (
        "closed_add_send",
        RuntimeError,
        "closed",
        lambda c: c.closed_nixl.add_send(_rows(c.weights[0], 0), 0, 1),
    ),
    (
        "closed_add_recv",
        RuntimeError,
        "closed",
        lambda c: c.closed_nixl.add_recv(_rows(c.buffer, 0), 0, 1),
    ),
    ("closed_execute", RuntimeError, "closed", lambda c: c.closed_nixl.execute(c.old[0])),
    (
        "closed_set_context",
        RuntimeError,
        "closed",
        lambda c: c.closed_nixl.set_transfer_context(c.old, 0),
    ),
    ("closed_counters", RuntimeError, "closed", lambda c: c.closed_nixl.counters),
    (
        "closed_torch_add_send",
        RuntimeError,
        "closed",
        lambda c: c.closed_torch.add_send(_rows(c.weights[0], 0), 0, 1),
    ),
    # -- torch communicator calls -------------------------------------------------------
    (
        "torch_add_send_dst_rank_high",
        ValueError,
        "dst_rank",
        lambda c: c.torch_comm.add_send(_rows(c.weights[0], 0), 9, 1),
    ),
    (
        "torch_add_recv_expert_negative",
        ValueError,
        "expert_id",
        lambda c: c.torch_comm.add_recv(_rows(c.buffer, 0), 0, -3),
    ),
    (
        "torch_add_send_not_tensor",
        TypeError,
        "tensors[0]",
        lambda c: c.torch_comm.add_send(["x", *_rows(c.weights[0], 0)[1:]], 0, 1),
    ),
]


def run_all(rank: int, world: int) -> dict[str, tuple[str, str, bool]]:
    """Runs every case; returns ``name -> (exception type, message, nothing changed)``
    plus ``"__reuse__"``: the mismatches of a real rebalance afterwards."""
    old, new, _e = scenario(5, world, 2, 3, empty=1)
    weights, buffer = build(MIXED, old, rank, world)
    snap, buf_snap = snapshot(weights), snapshot([buffer])
    nixl = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=30.0)
    staged = eplb_xfer.NixlCommunicator(None, weights, buffer, mode="staged", timeout_s=30.0)
    closed = eplb_xfer.NixlCommunicator(None, weights, buffer, timeout_s=30.0)
    closed.close()
    closed_torch = eplb_xfer.TorchCommunicator(None)
    closed_torch.close()
    torch_comm = eplb_xfer.create_communicator("torch", None, weights, buffer)
    assert isinstance(torch_comm, eplb_xfer.TorchCommunicator)
    ctx = Ctx(
        rank, world, old, new, weights, buffer, nixl, staged, torch_comm, closed, closed_torch
    )
    out: dict[str, Any] = {}
    for name, _exc, _text, call in CASES:
        try:
            call(ctx)
            kind, msg = "no exception", ""
        except Exception as e:  # noqa: BLE001 - the test compares the type
            kind, msg = type(e).__name__, str(e)
        same = len(unchanged(weights, snap)) == len(weights)
        same = same and len(unchanged([buffer], buf_snap)) == 1
        out[name] = (kind, msg, same)
    errors = []
    for comm in (nixl, staged, ctx.torch_comm):
        fresh, _ = build(MIXED, old, rank, world)
        for lw, fl in zip(weights, fresh):
            for t, f in zip(lw, fl):
                t.copy_(f)
        eplb_xfer.rearrange_expert_weights_inplace(old, new, weights, buffer, None, comm)
        errors += check(MIXED, weights, old, new, rank, world)
    out["__reuse__"] = errors
    for comm in (nixl, staged):
        comm.close()
    return out
