"""Reading files and applying overrides; precedence defaults < file < overrides, pair by pair."""

from __future__ import annotations

import json

import pytest

from zeroplan.schemas import ConfigError, apply_overrides, load_config, read_config_file


@pytest.fixture
def ds_file(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"train_batch_size": 16, "zero_optimization": {"stage": 2}}))
    return path


def test_file_beats_defaults(ds_file):
    assert load_config({"train_batch_size": 16}).zero_optimization.stage == 0  # DeepSpeed's default
    assert load_config(ds_file).zero_optimization.stage == 2


def test_override_beats_defaults():
    cfg = load_config({"train_batch_size": 8}, overrides=["zero_optimization.reduce_bucket_size=1e6"])
    assert cfg.zero_optimization.reduce_bucket_size == 1_000_000


def test_override_beats_file(ds_file):
    assert load_config(ds_file, overrides=["zero_optimization.stage=3"]).zero_optimization.stage == 3


def test_later_override_beats_earlier(ds_file):
    cfg = load_config(ds_file, overrides=["zero_optimization.stage=1", "zero_optimization.stage=3"])
    assert cfg.zero_optimization.stage == 3


def test_override_values_are_read_as_yaml(ds_file):
    cfg = load_config(ds_file, overrides=[
        "zero_optimization.overlap_comm=true", "optimizer.type=AdamW", "optimizer.params.betas=[0.9, 0.95]",
        "train_micro_batch_size_per_gpu=auto"])
    assert cfg.zero_optimization.overlap_comm is True
    assert cfg.optimizer.params.betas == (0.9, 0.95)
    assert cfg.train_micro_batch_size_per_gpu.__class__.__name__ == "Auto"


def test_override_does_not_touch_the_input():
    data = {"train_batch_size": 8, "zero_optimization": {"stage": 1}}
    apply_overrides(data, ["zero_optimization.stage=2"])
    assert data["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize("bad", ["stage", "=2", "a..b=1", "zero_optimization.=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="not of the form dotted.key=value"):
        apply_overrides({}, [bad])


def test_override_into_a_non_mapping():
    with pytest.raises(ConfigError, match="descends into a value that is not a mapping"):
        apply_overrides({"train_batch_size": 8}, ["train_batch_size.x=1"])


def test_override_typo_gets_did_you_mean(ds_file):
    with pytest.raises(ConfigError, match="did you mean 'stage'"):
        load_config(ds_file, overrides=["zero_optimization.stag=3"])


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        read_config_file(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_config_file(tmp_path)


def test_ten_megabyte_file_is_refused_quickly(tmp_path):
    path = tmp_path / "huge.json"
    path.write_text('{"train_batch_size": 8, "pad": "' + "x" * (10 * 1024 * 1024) + '"}')
    with pytest.raises(ConfigError, match=r"file is 10\.5 MB; a training config is a few KB"):
        read_config_file(path)


def test_yaml_and_json_give_the_same_config(tmp_path):
    data = {"train_batch_size": 16, "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8}}
    (tmp_path / "c.json").write_text(json.dumps(data))
    (tmp_path / "c.yaml").write_text("train_batch_size: 16\nzero_optimization:\n  stage: 2\n  reduce_bucket_size: 5e8\n")
    assert load_config(tmp_path / "c.json") == load_config(tmp_path / "c.yaml")


def test_deeply_nested_json_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError):
        read_config_file(path)
