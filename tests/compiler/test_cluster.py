"""ClusterSpec presets, files and the `local` preset."""

from __future__ import annotations

import pytest

from zeroplan.schemas import CLUSTER_PRESETS, ClusterSpec, ConfigError


def test_presets_are_nominal_and_round_trip():
    for name, spec in CLUSTER_PRESETS.items():
        assert spec.rates_source == "nominal" and spec.notes
        assert ClusterSpec.model_validate_json(spec.to_json()) == spec


def test_local_reads_the_probe_file_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="zeroplan probe"):
        ClusterSpec.load("local")
    spec = CLUSTER_PRESETS["cpu"].model_copy(update={"name": "local", "rates_source": "measured"})
    (tmp_path / "cluster.json").write_text(spec.to_json())
    assert ClusterSpec.load("local") == spec


def test_bad_cluster_file_names_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"name": "x"}')
    with pytest.raises(ConfigError) as e:
        ClusterSpec.load(path)
    assert e.value.source == str(path)


def test_cpu_ranks_share_host_memory():
    cpu = CLUSTER_PRESETS["cpu"]
    assert cpu.with_shape(nproc_per_node=4).memory_per_rank() == cpu.host_memory_bytes // 4
    assert CLUSTER_PRESETS["h100-80"].with_shape(nnodes=2).world_size == 16
