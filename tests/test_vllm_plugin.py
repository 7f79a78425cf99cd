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
