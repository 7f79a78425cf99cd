"""The vLLM plugin: registration against a stand-in module tree with vLLM's
names (tests/fake_vllm), and transfers through what the factory returns
(real NIXL)."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import workers

FAKE = str(Path(__file__).parent / "fake_vllm")


def _run(code: str, with_fake: bool = True) -> str:
    env_path = f"import sys; sys.path.insert(0, {FAKE!r})\n" if with_fake else ""
    out = subprocess.run(
        [sys.executable, "-c", env_path + code], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_entry_point_is_declared_for_vllm():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.name == "eplb_xfer" and ep.value == "eplb_xfer.vllm:register" for ep in eps)


def test_import_eplb_xfer_never_imports_vllm():
    assert _run("import eplb_xfer, sys; print('vllm' in sys.modules)") == "False"


def test_register_without_vllm_does_nothing():
    assert _run("import eplb_xfer.vllm as p; p.register(); print('ok')", with_fake=False) == "ok"


def test_register_patches_every_binding_once_and_keeps_other_backends():
    code = """
import eplb_xfer.vllm as plugin
from vllm.distributed.eplb import eplb_communicator as ec, eplb_state as es
from vllm.distributed.elastic_ep import elastic_execute as ee
original = ec.create_eplb_communicator
plugin.register(); plugin.register()  # idempotent
f = ec.create_eplb_communicator
assert f is not original and f.__wrapped__ is original
assert es.create_eplb_communicator is f and ee.create_eplb_communicator is f
c = es.create_eplb_communicator(
    group_coordinator=object(), backend="nixl", expert_weights=[], expert_buffer=[]
)
assert type(c).__name__ == "VllmNixlCommunicator", type(c)
assert c.needs_profile_buffer_reservation is False  # readable before any set-up
own = ee.create_eplb_communicator(
    group_coordinator=None, backend="torch_gloo", expert_weights=[], expert_buffer=[]
)
assert own == ("vllm-own", "torch_gloo")
try:
    f(group_coordinator=None, backend="carrier", expert_weights=[], expert_buffer=[])
except ValueError as e:
    assert "Unknown" in str(e)
print("ok")
"""
    assert _run(code) == "ok"


@pytest.mark.parametrize("style", ["context", "thread"])
def test_transfers_through_the_plugins_communicator(world, style):
    """vLLM's sequence through what the factory returns for "nixl": set-up is
    deferred to the first call, then every byte lands."""
    for rank_report in world(workers.vllm_style, 2, "vllm", [31], style):
        for case in rank_report:
            assert case["errors"] == [], case["errors"][:3]


def test_plugin_module_loads():
    assert importlib.import_module("eplb_xfer.vllm").BACKEND == "nixl"


def test_register_offers_the_migration_aware_policy_as_default():
    code = """
import torch
import eplb_xfer.vllm as plugin
from vllm.distributed.eplb.policy import EPLB_POLICIES, DefaultEplbPolicy
from vllm.distributed.eplb.policy.abstract import AbstractEplbPolicy
plugin.register()
cls = EPLB_POLICIES["default"]
assert cls is not DefaultEplbPolicy and issubclass(cls, AbstractEplbPolicy), cls
w = torch.rand(2, 16)
old = cls.rebalance_experts(w, 20, 4, 2, 4)            # no old map: DeepSeek's algorithm
new = cls.rebalance_experts(w * 1.05, 20, 4, 2, 4, old)  # keeps experts in place
assert new.dtype == torch.int64 and tuple(new.shape) == (2, 20)
moved = sum(len(set(new[l, r*5:(r+1)*5].tolist()) - set(old[l, r*5:(r+1)*5].tolist()))
            for l in range(2) for r in range(4))
print(moved)
"""
    assert int(_run(code)) <= 4  # a 5% drift moves (almost) nothing
