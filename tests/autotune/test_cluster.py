"""`--cluster auto`: the tuner ranks with a measured cluster whenever it can (autotune/cluster.py)."""

from __future__ import annotations

import sys

import pytest

from zeroplan.autotune import cluster as auto_cluster
from zeroplan.autotune.cluster import resolve_cluster
from zeroplan.schemas import CLUSTER_PRESETS, ConfigWarning


def _measured(nproc: int):
    return CLUSTER_PRESETS["cpu"].model_copy(update={"name": "local", "rates_source": "measured",
                                                     "nproc_per_node": nproc})


def test_a_named_cluster_is_used_as_given(tmp_path):
    spec, source = resolve_cluster("h100-80", out_dir=tmp_path, nproc=2)
    assert spec.name == "h100-80" and source == "h100-80"


def test_auto_prefers_the_probe_file_here_when_it_has_the_same_ranks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cluster.json").write_text(_measured(2).to_json())
    spec, source = resolve_cluster("auto", out_dir=tmp_path / "out", nproc=2)
    assert spec.rates_source == "measured" and "cluster.json" in source


def test_auto_reuses_the_studys_probe_and_skips_one_of_other_ranks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cluster.json").write_text(_measured(4).to_json())  # measured with 4 ranks: not ours
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cluster.json").write_text(_measured(2).to_json())
    spec, source = resolve_cluster("auto", out_dir=tmp_path / "out", nproc=2)
    assert spec.nproc_per_node == 2 and str(tmp_path / "out") in source


def test_a_failed_probe_falls_back_to_the_cpu_preset_with_a_notice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(auto_cluster, "probe_command",
                        lambda **_: [sys.executable, "-c", "import sys; sys.exit('no gloo here')"])
    with pytest.warns(ConfigWarning, match="no gloo here"):
        spec, source = resolve_cluster("auto", out_dir=tmp_path / "out", nproc=2)
    assert spec == CLUSTER_PRESETS["cpu"] and "nominal" in source
