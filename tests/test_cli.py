"""Experiment configs: multi-experiment files, --set / --only / --root, clear errors, the shipped presets."""

import argparse
from pathlib import Path

import pytest

from pipeline.config import DistillConfig
from pipeline.cli import load_config_with_overrides, load_experiments

ROOT = Path(__file__).resolve().parents[1]


def load(*argv):
    return load_experiments(DistillConfig, argparse.ArgumentParser(), list(argv))[0]


def test_the_embedded_default_holds_the_three_families(monkeypatch, tmp_path):
    monkeypatch.delenv("WAND_ROOT", raising=False)
    monkeypatch.chdir(ROOT)
    configs = load("--config", "jobs/configs/tiny.yaml")
    assert [c.model for c in configs] == ["cosyvoice2", "indextts", "sparktts"]
    assert all(c.model_size == "mini" and c.curriculum.stages == 2 for c in configs)
    # Without --root, relative paths are under the current directory, made absolute here: Ray Train's
    # workers run in a folder of their own, where teachers/cosyvoice2 would name nothing.
    assert [c.teacher_source for c in configs] == [str(ROOT / "teachers" / c.model) for c in configs]
    assert all((Path(c.teacher_source) / "teacher.json").exists() for c in configs)  # committed
    assert configs[1].evaluate.corpus == str(ROOT / "runs/corpus/syn-indextts-heldout")
    assert configs[1].evaluate.windows == [4, 8, 16, 32]  # defaults merged into the entry
    monkeypatch.chdir(tmp_path)
    (elsewhere,) = load("--config", str(ROOT / "jobs/configs/tiny.yaml"), "--only", "indextts")
    assert elsewhere.corpus == str(tmp_path / "runs/corpus/syn-indextts")
    assert elsewhere.teacher_source == "teachers/indextts"  # no such folder here: left as given (could be an HF id)


def test_set_only_and_root(tmp_path):
    configs = load("--config", str(ROOT / "jobs/configs/tiny.yaml"), "--only", "sparktts",
                   "--set", "curriculum.stages=3", "--set", "storage=s3://bucket/runs", "--root", str(tmp_path))
    (config,) = configs
    assert config.model == "sparktts" and config.curriculum.stages == 3 and config.train.num_workers == 2
    assert config.storage == "s3://bucket/runs"  # remote paths are left alone
    assert config.corpus == str(tmp_path / "runs/corpus/syn-sparktts")
    assert config.evaluate.corpus == str(tmp_path / "runs/corpus/syn-sparktts-heldout")
    assert config.teacher_source == "teachers/sparktts"  # not under tmp_path: left as given (could be an HF id)
    (rooted,) = load("--config", str(ROOT / "jobs/configs/tiny.yaml"), "--only", "sparktts", "--root", str(ROOT))
    assert rooted.teacher_source == str(ROOT / "teachers/sparktts")


def test_single_experiment_entry_points_need_only(capsys):
    with pytest.raises(SystemExit):
        load_config_with_overrides(DistillConfig, argparse.ArgumentParser(), ["--config", str(ROOT / "jobs/configs/tiny.yaml")])
    assert "holds 3 experiments" in capsys.readouterr().err


def test_errors_name_the_experiment_and_field(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load("--config", str(ROOT / "jobs/configs/tiny.yaml"), "--set", "curriculum.window_target=64")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "experiment tiny-cosyvoice2" in err and "window_target (64) must be <= window_start" in err
    with pytest.raises(SystemExit):
        load("--config", str(ROOT / "jobs/configs/tiny.yaml"), "--set", "evaluate.rows=0")
    assert "evaluate.rows" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load("--config", str(ROOT / "jobs/configs/tiny.yaml"), "--only", "tacotron")
    assert "--only tacotron: no experiment" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: {}\nexperiments: []\nstorage: x\n")
    with pytest.raises(SystemExit):
        load("--config", str(bad))
    assert "holds only 'defaults' and 'experiments'" in capsys.readouterr().err


def test_every_stage_setting_has_one_place_in_the_experiment_config():
    """The sections are generated from the stage configs; the hand-kept lists (SHARED, CURRICULUM)
    must still put every stage field in exactly one place, so no setting is unreachable from YAML."""
    from pipeline.config import CURRICULUM, PRECOMPUTE, SHARED, TRAIN
    from pipeline.config import PrecomputeConfig
    from pipeline.config import TrainConfig

    places = [set(SHARED), set(CURRICULUM), set(TRAIN), {"k", "temperature"}]
    for a in range(len(places)):
        for b in range(a + 1, len(places)):
            assert not places[a] & places[b]
    assert set(TrainConfig.model_fields) == set().union(*places) - {"corpus"}
    assert set(PrecomputeConfig.model_fields) == (set(SHARED) & set(PrecomputeConfig.model_fields)) | set(PRECOMPUTE)
    assert {"k", "temperature"} <= set(PRECOMPUTE)  # training takes them from the precompute's section
