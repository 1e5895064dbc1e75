"""`python -m jobs.train_teachers --recipe RECORD` trains the teacher a teacher.json record describes and
says whether its weights are the record's to the bit (how `make teachers-strong` rebuilds the stronger
teachers the second results table was measured on)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.evals.ablation import long_form_rows
from pipeline.synthetic.law import SyntheticTask
from pipeline.synthetic.teachers import (learned_position_tables, sinusoidal_positions, spoken_quality, teacher_spec,
                                         train_teacher)

ROOT = Path(__file__).resolve().parents[2]


def test_a_record_trains_again_to_the_same_weights_and_other_flags_or_records_are_refused(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}  # as a user runs it

    def job(*flags):
        return subprocess.run([sys.executable, "-m", "jobs.train_teachers", "--heldout", "3", *flags], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)

    first = job("--models", "indextts", "--width", "48", "--layers", "2", "--heads", "2", "--phases", "12:4:8:2",
                "20:6:10:3", "--rows", "8", "--lr", "0.002", "--seed", "3", "--length-groups", "2",
                "--position-init", "sinusoidal", "--output", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-2000:]
    record_path = tmp_path / "a" / "indextts" / "teacher.json"
    record = json.loads(record_path.read_text())
    again = job("--recipe", str(record_path), "--output", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"indextts: the weights are those of {record_path}" in again.stdout
    rebuilt = json.loads((tmp_path / "b" / "indextts" / "teacher.json").read_text())
    assert rebuilt["files"] == record["files"] and rebuilt["backbone"] == record["backbone"]
    assert rebuilt["train"]["phases"] == record["train"]["phases"] and rebuilt["heldout"] == record["heldout"]
    assert rebuilt["reproduces"] == {"record": str(record_path), "same_weights": True}
    assert record["train"]["position_init"] == rebuilt["train"]["position_init"] == "sinusoidal"

    # A record whose weights this run does not reproduce is said so, loudly.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**record, "files": {name: "0" * 64 for name in record["files"]}}))
    differs = job("--recipe", str(other), "--output", str(tmp_path / "c"))
    assert differs.returncode == 0 and "the weights are NOT those of" in differs.stdout

    for flags, said in ((["--recipe", str(record_path), "--lr", "0.01"], "leave out --lr"),
                        (["--recipe", str(record_path), "--models", "sparktts"], "leave out --models"),
                        (["--recipe", str(tmp_path / "missing.json")], "not a teacher.json record"),
                        (["--models", "sparktts", "--position-init", "sinusoidal"], "sparktts has no learned position"),
                        (["--init-from", str(tmp_path / "a"), "--models", "indextts", "--position-init", "sinusoidal"],
                         "a continuation (--init-from) keeps its source's positions"),
                        (["--recipe", str(_with(tmp_path, record, task={**record["task"], "speakers": 3}))],
                         "another preset or corpus")):
        refused = job(*flags, "--output", str(tmp_path / "d"))
        assert refused.returncode == 2 and said in refused.stderr, (flags, refused.stderr[-500:])
    assert not (tmp_path / "d").exists()  # refused before anything was written


def _with(tmp_path: Path, record: dict, **changed) -> Path:
    path = tmp_path / "changed.json"
    path.write_text(json.dumps({**record, **changed}))
    return path


def test_a_teacher_continued_on_longer_texts_records_its_source_and_trains_again_only_from_it(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}

    def job(*flags):
        return subprocess.run([sys.executable, "-m", "jobs.train_teachers", "--heldout", "3", *flags],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    source = job("--rows", "8", "--models", "sparktts", "--width", "48", "--layers", "2", "--heads", "2", "--phases", "15:4:8:2",
                 "--output", str(tmp_path / "a"))
    assert source.returncode == 0, source.stderr[-2000:]
    source_record = json.loads((tmp_path / "a" / "sparktts" / "teacher.json").read_text())
    continued = job("--rows", "8", "--models", "sparktts", "--init-from", str(tmp_path / "a"), "--phases", "6:10:16:2", "--lr", "0.001",
                    "--long-rows", "2", "--output", str(tmp_path / "b"))
    assert continued.returncode == 0, continued.stderr[-2000:]
    record_path = tmp_path / "b" / "sparktts" / "teacher.json"
    record = json.loads(record_path.read_text())
    # The source's backbone without the flags, its files and recipe kept; new weights.
    assert record["backbone"] == source_record["backbone"] == {"width": 48, "layers": 2, "heads": 2}
    assert record["train"]["init_from"] == {"folder": str(tmp_path / "a"), "files": source_record["files"],
                                            "train": source_record["train"]}
    assert record["train"]["phases"] == [{"steps": 6, "min_text": 10, "max_text": 16, "batch_size": 2}]
    assert record["files"] != source_record["files"]
    # --long-rows: what it says on the results table's long-form rows, at the end and along the curve.
    long_form, _ = long_form_rows(teacher_spec("sparktts", record["backbone"]), SyntheticTask(), 2, 1)
    spec = teacher_spec("sparktts", record["backbone"])
    saved = spoken_quality(spec, spec.load(str(tmp_path / "b" / "sparktts")), long_form, SyntheticTask())
    assert record["long_form"] == {"seed": 1, **saved}  # the saved weights on those very rows
    assert [r["id"] for r in long_form] == ["syn-longform-1001-00000", "syn-longform-1001-00001"]
    assert record["curve"]["points"][-1]["step"] == 6 and "long_per" in record["curve"]["points"][-1]
    assert "long_form" not in source_record and "long_per" not in source_record["curve"]["points"][-1]
    # Started from the source, not from random weights: at a vanishing lr the weights stay the source's.
    still = job("--rows", "8", "--models", "sparktts", "--init-from", str(tmp_path / "a"), "--phases", "2:10:16:2", "--lr", "1e-12",
                "--output", str(tmp_path / "still"))
    assert still.returncode == 0, still.stderr[-2000:]
    kept, start = (load_file(tmp_path / d / "sparktts" / "model.safetensors") for d in ("still", "a"))
    assert kept.keys() == start.keys() and all(torch.allclose(kept[k], start[k], atol=1e-6) for k in kept)

    again = job("--recipe", str(record_path), "--output", str(tmp_path / "c"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"sparktts: the weights are those of {record_path}" in again.stdout

    # --recipe needs the very source the record started from: other weights there are refused.
    (tmp_path / "a").rename(tmp_path / "a-kept")
    (tmp_path / "still").rename(tmp_path / "a")  # a sha256 of its own, the weights all but the same
    moved = job("--recipe", str(record_path), "--init-from", str(tmp_path / "a-kept"), "--output", str(tmp_path / "e"))
    assert moved.returncode == 0, moved.stderr[-2000:]  # the source found where it lies now, by its sha256
    assert f"sparktts: the weights are those of {record_path}" in moved.stdout
    for flags, said in ((["--recipe", str(record_path)], "holds other weights than the teacher the record started from"),
                        (["--recipe", str(tmp_path / "a-kept" / "sparktts" / "teacher.json"), "--init-from",
                          str(tmp_path / "a-kept")], "was trained from random weights, not continued"),
                        (["--models", "sparktts", "--init-from", str(tmp_path / "none"), "--phases", "2:4:8:2"],
                         "holds no teacher this job can continue"),
                        (["--models", "sparktts", "--init-from", str(tmp_path / "a-kept"), "--width", "64",
                          "--phases", "2:4:8:2"], "leave out --width/--layers/--heads"),
                        (["--models", "sparktts", "--init-from", str(tmp_path / "a-kept"), "--rescore"], "--rescore")):
        refused = job(*flags, "--output", str(tmp_path / "d"))
        assert refused.returncode == 2 and said in refused.stderr, (flags, refused.stderr[-500:])
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_a_rebuild_names_a_record_in_the_repository_as_the_repository_does(tmp_path, monkeypatch):
    from jobs.train_teachers import repo_relative

    monkeypatch.chdir(tmp_path)  # given absolute or from elsewhere, a record of this repository reads the same
    inside = ROOT / "benchmarks/results/teacher_longer_wider_positions_indextts.json"
    assert repo_relative(inside) == "benchmarks/results/teacher_longer_wider_positions_indextts.json"
    assert (ROOT / repo_relative(inside)).is_file()
    assert repo_relative(tmp_path / "teacher.json") == str(tmp_path / "teacher.json")  # elsewhere: as given


def test_a_sinusoidal_position_init_sets_only_the_learned_position_tables_to_scaled_sinusoids():
    """Against the formula written out here (sin / cos of p / 10000^(2i / width), scaled to the random
    table's standard deviation over 1 / sqrt 2), element by element; every other weight is the seeded
    random init's; a model with rotary positions, or a continuation, is refused."""
    spec = teacher_spec("indextts")
    torch.manual_seed(0)
    random_init = spec.build()
    torch.manual_seed(0)
    model = spec.build()
    stds = {name: float(t.weight.std()) for name, t in learned_position_tables(model).items()}
    names = sinusoidal_positions(model)
    assert sorted(names) == ["mel_pos_embedding.emb", "text_pos_embedding.emb"]
    after = model.state_dict()
    for key, value in random_init.state_dict().items():
        if not any(key.startswith(name) for name in names):
            assert torch.equal(after[key], value), key
    for name in names:
        weight = after[name + ".weight"]
        rows, width = weight.shape
        for p in (0, 1, 7, rows - 1):
            for i in range(0, width, 2):
                angle = p / 10000 ** (i / width)
                scale = stds[name] / math.sqrt(0.5)
                # float32 angles: up to 3e-5 off at the last rows' angles of about 330 radians
                assert math.isclose(weight[p, i].item(), scale * math.sin(angle), abs_tol=1e-4)
                assert math.isclose(weight[p, i + 1].item(), scale * math.cos(angle), abs_tol=1e-4)
    with pytest.raises(ValueError, match="no learned position tables"):
        sinusoidal_positions(teacher_spec("cosyvoice2").build())
    with pytest.raises(ValueError, match="a continuation"):
        train_teacher(spec, [], position_init="sinusoidal", start=random_init.state_dict())
    with pytest.raises(ValueError, match="position_init must be one of"):
        train_teacher(spec, [], position_init="learned")
