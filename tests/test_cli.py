"""The console script: demo (main job) and memory model."""

from __future__ import annotations

import pytest

from eplb_xfer import cli
from eplb_xfer.memory import memory_table
from eplb_xfer.models import check_expert_bytes


def test_model_shapes_match_the_published_expert_sizes():
    check_expert_bytes()


def test_memory_model_reproduces_the_v2_figure():
    # PR #40013: DeepSeek-V3.2, EP=8, 288 slots -> about 4.4 GiB for the packed design
    row = memory_table(["deepseek-v3"], [8], redundancy=32)[0]
    assert row["v2_packed"] / 2**30 == pytest.approx(4.43, abs=0.01)
    assert row["ours_zero_copy"] < row["v2_packed"] < row["v1_nixl"]


@pytest.mark.parametrize("backend", ["nixl", "torch"])
def test_demo_runs_and_verifies(backend, capsys):
    assert cli.main(["demo", "--ranks", "2", "--layers", "2", "--backend", backend]) == 0
    assert "byte-exact" in capsys.readouterr().out


def test_bad_arguments_name_the_flag(capsys):
    assert cli.main(["demo", "--ranks", "1"]) != 0
    assert "--ranks" in capsys.readouterr().err
