"""Curriculum stages on Ray Train + DeepSpeed (2 workers, gloo, CPU), chained into a student."""

import pytest

import wand
from helpers import precomputed_tiny_corpus
from pipeline.chain import load_student, run_chain
from pipeline.config import CURRICULUM, DistillConfig
from pipeline.config import TrainConfig
from pipeline.train.driver import plan_stages, preflight, run_stage, stage_record
from pipeline.train.worker import FAULT_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    return precomputed_tiny_corpus(tmp_path_factory.mktemp("train"), seed=21)


def base(root, **changes):
    curriculum = {"stages": 2, "window_start": 16, "window_target": 4, "lr": 1e-2, "epochs": 3.0}
    train = {"batch_size": 2, "num_workers": 2, "checkpoint_every": 4}
    for key, value in changes.items():
        (curriculum if key in CURRICULUM else train)[key] = value
    return DistillConfig(experiment="exp", model="cosyvoice2", model_size="tiny", corpus=str(root / "corpus"),
                         shards=str(root / "topk"), storage=str(root / "ckpt"), precompute={"k": 8, "rows_per_shard": 16},
                         curriculum=curriculum, train=train,
                         evaluate={"seconds": [2.0], "windows": [4, 8], "allow_training_corpus": True})


def assert_steps_exactly_once(record, stage):
    steps = [m["step"] for m in record["metrics"]]
    assert steps == list(range(stage.start, stage.end))


def test_two_chained_zero2_stages_then_student(shards):
    config = base(shards, zero_stage=2)
    summary = run_chain(config)
    train = config.train_config()
    _, curriculum = preflight(train)
    first, second = summary["stages"]
    # Stage 2 starts from stage 1's final weights; stage 1 from the teacher the shards were made with.
    assert second["init_param_checksum"] == first["param_checksum"]
    from pipeline.data.shards import load_manifest

    assert first["init_param_checksum"] == load_manifest(config.shards)["teacher"]["fingerprint"]
    metrics = first["metrics"] + second["metrics"]
    assert [m["step"] for m in metrics] == list(range(curriculum.total_steps))
    for m in metrics:  # the window and tau each step used follow the schedule
        assert m["window"] == curriculum.window(m["step"]) and m["tau"] == pytest.approx(curriculum.tau(m["step"]))
    assert metrics[0]["window"] == 16 and metrics[-1]["window"] == 4
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    # The consolidated student loads with one call and decodes with a constant-size cache.
    assert summary["evals"]["kv_wand_bytes_2s"] < summary["evals"]["kv_full_bytes_2s"]
    student = load_student(config)
    assert wand.models.weights.fingerprint(student.state_dict()) == second["param_checksum"]
    # Resubmitting the finished chain runs nothing and returns the same records.
    again = run_chain(config)
    assert [r["checkpoint"] for r in again["stages"]] == [r["checkpoint"] for r in summary["stages"]]


def test_zero3_stage(shards):
    config = base(shards, zero_stage=3, stages=1, epochs=1.0).model_copy(update={"experiment": "z3"})
    train = config.train_config()
    record = run_stage(train, 1)
    assert_steps_exactly_once(record, plan_stages(train)[0])
    assert record["init_param_checksum"] != record["param_checksum"]


def test_worker_death_resumes_from_the_last_checkpoint_with_the_same_rows(shards, tmp_path, monkeypatch):
    config = base(shards, stages=1, epochs=1.0, max_failures=1)
    reference = run_stage(config.train_config().model_copy(update={"experiment": "no-fault"}), 1)
    train = config.train_config().model_copy(update={"experiment": "fault"})
    monkeypatch.setenv(FAULT_ENV, f"5:{tmp_path / 'died'}")
    record = run_stage(train, 1)
    assert (tmp_path / "died").exists()  # a worker really died
    assert record["starts"] == [0, 4]  # restarted from the step-4 checkpoint
    assert_steps_exactly_once(record, plan_stages(train)[0])
    # The resumed stage read the rows an uninterrupted one reads (the order is the seed's): the same
    # losses step by step and the same final weights.
    assert [m["loss"] for m in record["metrics"]] == pytest.approx([m["loss"] for m in reference["metrics"]], rel=1e-5)
    assert record["param_checksum"] == reference["param_checksum"]


def test_resubmitted_stage_resumes_instead_of_restarting(shards, tmp_path, monkeypatch):
    config = base(shards, stages=1, epochs=1.0, max_failures=0)
    train = config.train_config().model_copy(update={"experiment": "resubmit"})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAULT_ENV, f"5:{tmp_path / 'died'}")
        with pytest.raises(Exception):
            run_stage(train, 1)
    assert stage_record(train, 1) is None
    record = run_stage(train, 1)  # the same command again
    assert record["starts"] == [0, 4]
    assert_steps_exactly_once(record, plan_stages(train)[0])


def test_bad_configs_fail_before_training(shards, tmp_path):
    with pytest.raises(ValueError, match="unknown model preset 'tacotron'"):
        base(shards).model_copy(update={"model": "tacotron"}).train_config()
    with pytest.raises(ValueError, match=r"window_target \(200\) must be <= window_start"):
        base(shards, window_target=200).train_config()
    with pytest.raises(ValueError, match="curriculum.stages"):
        base(shards, stages=0)
    with pytest.raises(ValueError, match="shards: no manifest.json"):
        preflight(base(shards).train_config().model_copy(update={"shards": str(tmp_path / "none")}))
    with pytest.raises(ValueError, match="temperature=1.0 .config: 2.0"):
        preflight(base(shards).train_config().model_copy(update={"temperature": 2.0}))
    with pytest.raises(ValueError, match="shards: made by teacher .* seed=0; config has .* seed=3"):
        preflight(base(shards).train_config().model_copy(update={"teacher_seed": 3}))
    with pytest.raises(ValueError, match="k: the shards hold the teacher's top-8, the config expects top-16"):
        preflight(base(shards).train_config().model_copy(update={"k": 16}))
    with pytest.raises(ValueError, match="stages: 500 stages need at least as many steps"):
        preflight(base(shards).train_config().model_copy(update={"stages": 500}))
    with pytest.raises(ValueError, match="stage 1 has not finished"):
        run_stage(base(shards).train_config().model_copy(update={"experiment": "nothing-yet"}), 2)


def test_a_stage_left_by_a_different_run_is_refused_with_the_difference():
    from pipeline.train.driver import check_same_run

    config = TrainConfig(experiment="demo", model="cosyvoice2", model_size="mini", shards="s", storage="st")
    identity = {"model": "cosyvoice2", "model_size": "mini", "teacher_fingerprint": "abc", "total_steps": 32}
    check_same_run({"identity": dict(identity)}, identity, config, "st/demo/stage-1.json")  # the same run: reused
    with pytest.raises(ValueError) as err:
        check_same_run({"identity": {**identity, "model_size": "tiny"}}, identity, config, "st/demo/stage-1.json")
    message = str(err.value)
    assert "st/demo/stage-1.json" in message and "model_size: 'tiny' there, 'mini' now" in message
    assert "experiment 'demo'" in message
    with pytest.raises(ValueError, match="total_steps: 16 there, 32 now"):  # a record from before identities
        check_same_run({"total_steps": 16}, identity, config, "st/demo/stage-1.json")


def test_the_run_identity_covers_every_setting_that_changes_a_result():
    """Derived from the config: every field is in the identity unless it is declared operational, so
    a changed tau, warm-up, skew alpha or ZeRO stage is never reused silently, and a field added
    later is covered without editing a list."""
    from pipeline.train.driver import check_same_run, identity_fields, run_identity

    manifest = {"teacher": {"fingerprint": "t"}, "input": {"fingerprint": "d"}}
    config = TrainConfig(experiment="demo", model="cosyvoice2", model_size="mini", shards="s", storage="st")
    identity = run_identity(config, manifest, 32)
    assert {"tau_start", "tau_end", "warmup_fraction", "skew_alpha", "weight_decay", "zero_stage", "lr",
            "gradient_clipping", "teacher_fingerprint", "data_fingerprint", "total_steps"} <= identity.keys()
    assert not {"storage", "shards", "checkpoint_every", "cpus_per_worker"} & identity.keys()
    assert {"seed", "shuffle_window"} <= identity.keys()  # they choose the rows
    for change in ({"tau_start": 0.7}, {"warmup_fraction": 0.1}, {"skew_alpha": 0.3}, {"zero_stage": 3},
                   {"weight_decay": 0.01}):
        other = run_identity(config.model_copy(update=change), manifest, 32)
        with pytest.raises(ValueError, match=f"{next(iter(change))}: "):
            check_same_run({"identity": identity}, other, config, "st/demo/stage-1.json")
    # Operational settings do not split a run.
    moved = config.model_copy(update={"storage": "s3://b/x", "checkpoint_every": 7, "cpus_per_worker": 1.0})
    check_same_run({"identity": identity}, run_identity(moved, manifest, 32), config, "st/demo/stage-1.json")
    # New teacher weights or new data: a different run.
    with pytest.raises(ValueError, match="data_fingerprint: 'd' there, 'e' now"):
        check_same_run({"identity": identity}, run_identity(config, {**manifest, "input": {"fingerprint": "e"}}, 32),
                       config, "st/demo/stage-1.json")

    class Extended(TrainConfig):
        label_smoothing: float = 0.0  # a setting added later, with no list edited

    assert "label_smoothing" in identity_fields(Extended)
    extended = Extended(experiment="demo", model="cosyvoice2", model_size="mini", shards="s", storage="st")
    assert run_identity(extended, manifest, 32)["label_smoothing"] == 0.0


def test_the_attention_backend_is_a_training_setting():
    config = dict(experiment="demo", model="cosyvoice2", model_size="mini", shards="s", storage="st")
    assert TrainConfig(**config).resolved_attention() == "sdpa"  # CPU workers: the dense mask
    assert TrainConfig(**config, use_gpu=True).resolved_attention() == "flex"  # GPUs: block-sparse
    assert TrainConfig(**config, use_gpu=True, attention="sdpa").resolved_attention() == "sdpa"
    with pytest.raises(ValueError, match="attention: flex trains on GPUs only"):
        TrainConfig(**config, attention="flex")
