"""Every config of the pipeline, typed and validated when it is read: the experiment config
(``DistillConfig``: the shared facts at the top, one section per step) and the stage configs derived
from it once (``PrecomputeConfig``, ``TrainConfig``), plus the ``evaluate:`` and ``tracking:``
sections. A field is defined once, in the stage config that uses it; the experiment config reuses
its definition (type, default, limits, description). Nothing here touches Ray, MLflow or storage.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, create_model, Field, field_validator, model_validator, ValidationError

from wand.curriculum import Curriculum
from wand.losses import KD_KINDS
from wand.models import get_spec, MODEL_NAMES, spec_for
from wand.models.weights import s3_endpoint

from pipeline import storage
from pipeline.checks import flatten, MAX_SEED, one_of, require_teacher_weights
from pipeline.redaction import has_credentials

# Fields that cannot change what a run computes (where it runs and stores, how often it saves, how
# it fails over). Every other field is part of the run identity: a new field is covered by default.
OPERATIONAL = {"json_schema_extra": {"operational": True}}

# A Ray label (``ray start --labels``, a node type's ``labels:``): an optional DNS-style prefix and a
# name of at most 63 characters; values the same characters, possibly empty.
_LABEL_KEY = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
_LABEL_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
LabelSelector = dict[Annotated[str, Field(pattern=_LABEL_KEY)], Annotated[str, Field(pattern=_LABEL_VALUE)]]


def label_selector_field(what: str):
    """The ``label_selector`` of one stage: Ray node labels its work must land on (cluster/ node types
    carry ``wand-role``); empty: anywhere the resources fit."""
    return Field({}, description=f"Ray node labels {what} must run on, e.g. {{wand-role: precompute}} on "
                                 "cluster/aws.yaml; empty: any node with the resources", **OPERATIONAL)


class TrainConfig(BaseModel):
    """Student distillation settings (one experiment = a chain of curriculum stages)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False)

    experiment: str = Field(description="run name prefix; stage k runs as <experiment>-stage<k>", **OPERATIONAL)
    model: str = Field(description="model preset (the teacher's; the student starts from its weights)")
    model_size: Literal["real", "small", "mini", "tiny"] = "real"
    teacher_source: str | None = Field(None, description="teacher weights (local, s3://, HF id); None = seeded random",
                                       **OPERATIONAL)  # the teacher fingerprint is in the identity
    teacher_seed: int = Field(0, ge=0, le=MAX_SEED, **OPERATIONAL)  # likewise (it makes the random teacher)
    shards: str = Field(description="teacher top-k shard folder (jobs/precompute.py output)", min_length=1,
                        **OPERATIONAL)
    k: int | None = Field(None, ge=1, description="the shards' top-k; None accepts what the manifest says",
                          **OPERATIONAL)  # a check on the shards (preflight), which hold one k
    storage: str = Field(description="Ray Train storage path for checkpoints: local folder or s3://bucket/prefix",
                         min_length=1, **OPERATIONAL)
    s3_endpoint: str | None = Field(None, **OPERATIONAL)
    stages: int = Field(3, ge=1, description="curriculum stages (separate Ray Train runs / resume points)")
    epochs: float = Field(1.0, gt=0, le=1000)
    batch_size: int = Field(8, ge=1, description="sequences per worker per step")
    window_start: int = Field(128, ge=1)
    window_target: int | None = Field(None, ge=1, description="default: the preset's target W")
    tau_start: float = Field(0.5, gt=0)
    tau_end: float | None = Field(1e4, gt=0, description="None: hard mask every step (no soft curriculum)")
    lr: float = Field(1e-5, gt=0)
    warmup_fraction: float = Field(0.03, ge=0, lt=1)
    hold_fraction: float = Field(0.0, ge=0, lt=1, description="the last steps at the target W (0: the paper's cosine)")
    weight_decay: float = Field(0.0, ge=0)
    kd_kind: str = Field("skew_fkl", description=f"one of {', '.join(KD_KINDS)}")
    kd_weight: float = Field(1.0, ge=0, description="lambda: loss = CE + lambda x KD")
    skew_alpha: float = Field(0.1, gt=0, lt=1)
    temperature: float = Field(1.0, gt=0, description="must equal the shards' temperature")
    zero_stage: Literal[1, 2, 3] = 2
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = Field(False, **OPERATIONAL)  # a resumed run may move between devices
    attention: Literal["auto", "flex", "sdpa"] = Field(
        "auto", description="the student's attention in training: flex (FlexAttention block masks, GPUs), "
        "sdpa (the dense mask); auto = flex with GPUs, sdpa without", **OPERATIONAL)  # the same function
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional on small machines (the evals' task needs CPUs too)",
                                   **OPERATIONAL)
    label_selector: LabelSelector = label_selector_field("the training workers")
    max_failures: int = Field(2, ge=0, **OPERATIONAL)
    checkpoint_every: int = Field(50, ge=1, **OPERATIONAL)
    progress_every_s: float = Field(30.0, gt=0, description="seconds between progress lines in the job's log",
                                    **OPERATIONAL)
    loss_chunk_size: int = Field(1024, ge=1, **OPERATIONAL)  # memory only: the loss is the same
    gradient_clipping: float = Field(1.0, ge=0)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="the order of the training rows (a seeded shuffle per epoch)")
    shuffle_window: int = Field(16, ge=1, description="rows of this many shards are shuffled together "
                                "(memory: a worker holds up to twice as many shards)")

    @field_validator("experiment")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError("experiment must be letters, digits, '_', '.', '-' (it names runs and folders)")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return one_of(value, MODEL_NAMES, "model preset")

    @field_validator("kd_kind")
    @classmethod
    def _known_kd(cls, value: str) -> str:
        return one_of(value, KD_KINDS, "kd_kind")

    @model_validator(mode="after")
    def _windows(self) -> "TrainConfig":
        require_teacher_weights(self.model_size, self.teacher_source)
        if self.attention == "flex" and not self.use_gpu:
            raise ValueError("attention: flex trains on GPUs only (FlexAttention has no CPU backward); "
                             "use sdpa, or auto, on CPU workers")
        target = self.resolved_window_target()
        if target > self.window_start:
            raise ValueError(f"window_target ({target}) must be <= window_start ({self.window_start})")
        context = get_spec(self.model, self.model_size).context_length
        if context is not None and self.window_start > context:
            raise ValueError(f"window_start ({self.window_start}) is wider than {self.model}'s context of {context} "
                             "positions: such a window never masks anything")
        return self

    def spec(self):
        with s3_endpoint(self.s3_endpoint):
            return spec_for(self.model, self.model_size, self.teacher_source)

    def resolved_attention(self) -> str:
        """The ``enable_wand`` backend the workers train with."""
        if self.attention == "auto":
            return "flex" if self.use_gpu else "sdpa"
        return self.attention

    def resolved_window_target(self) -> int:
        # The preset's W: no need for the checkpoint's tokenizer (validation never reads S3).
        return self.window_target or get_spec(self.model, self.model_size).target_window

    def curriculum(self, total_steps: int) -> Curriculum:
        return Curriculum(total_steps=total_steps, window_start=self.window_start,
                          window_target=self.resolved_window_target(), tau_start=self.tau_start,
                          tau_end=self.tau_end, lr=self.lr, warmup_fraction=self.warmup_fraction,
                          hold_fraction=self.hold_fraction)

    def run_name(self, stage: int) -> str:
        return f"{self.experiment}-stage{stage}"


class PrecomputeConfig(BaseModel):
    """Settings of the teacher top-k stage. Shards record them; a resume must match them."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False)

    model: str = Field(description="the teacher's model preset, one of wand.models.MODEL_NAMES")
    model_size: Literal["real", "small", "mini", "tiny"] = "real"
    teacher_source: str | None = Field(None, description="weights: local path, s3:// URI or HF id; None = "
                                       "random weights from teacher_seed (tests and demos only)")
    teacher_seed: int = Field(0, ge=0, le=MAX_SEED)
    corpus: str = Field(description="tokenized corpus: a Parquet/JSONL file or a folder of them, local or s3://",
                        min_length=1)
    shards: str = Field(description="where the teacher top-k shards go: a folder, local or s3://bucket/prefix",
                        min_length=1)
    k: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    value_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    rows_per_shard: int = Field(1000, ge=1)
    max_tokens_per_batch: int = Field(16384, ge=1, description="padded tokens per teacher forward")
    num_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    num_cpus_per_actor: float = Field(0.5, gt=0, description="fractional on small machines: read tasks need CPUs too")
    read_num_cpus: float = Field(0.5, gt=0)
    label_selector: LabelSelector = label_selector_field("the teacher actors")
    on_bad_rows: Literal["fail", "quarantine"] = "fail"
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint; default AWS_ENDPOINT_URL")

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return one_of(value, MODEL_NAMES, "model preset")

    @model_validator(mode="after")
    def _k_fits(self) -> "PrecomputeConfig":
        require_teacher_weights(self.model_size, self.teacher_source)
        spec = get_spec(self.model, self.model_size)
        if spec.speech_range[0] >= 0 and self.k > len(spec.target_ids()):
            raise ValueError(f"k ({self.k}) exceeds the target vocabulary of {self.model} ({len(spec.target_ids())})")
        return self

    def spec(self):
        with s3_endpoint(self.s3_endpoint):
            return spec_for(self.model, self.model_size, self.teacher_source)

    def resume_key(self) -> dict:
        """What must be equal for existing shards to be reused (under the names shards record)."""
        key = self.model_dump(include={"teacher_source", "teacher_seed", "k", "temperature", "value_dtype",
                                       "rows_per_shard"})
        return {"teacher": self.model, "teacher_size": self.model_size, **key}


MAX_SECONDS = 3600.0  # an hour of audio per memory/latency point: beyond it an eval decodes for days


class EvalConfig(BaseModel):
    """The ``evaluate:`` section of an experiment config."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False)

    enabled: bool = True
    corpus: str | None = Field(None, description="held-out rows (corpus schema); None: the training corpus (flagged)")
    rows: int = Field(8, ge=1, description="held-out sequences for the quality and attention-mass evals")
    seconds: list[Annotated[float, Field(gt=0, le=MAX_SECONDS)]] = Field(
        [10.0, 30.0, 60.0], min_length=1, description=f"audio lengths for memory/latency/FLOPs (0 < s <= {MAX_SECONDS})")
    windows: list[Annotated[int, Field(ge=1)]] = Field([4, 8, 16, 32, 64, 128], min_length=1,
                                                       description="W values for the window chooser")
    latency_buckets: int = Field(10, ge=1)
    latency_repeats: int = Field(
        3, ge=1, le=20, description="timed decodes per model; a step's time is its fastest of them (another "
        "process on the machine only ever adds time, so one busy moment cannot tilt the late/early ratio)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:[0-9]{1,3})$",
                        description="auto (cuda if available) | cpu | cuda | cuda:N")
    num_gpus: float | Literal["auto"] = Field(
        "auto", description="GPUs of the Ray task the evals run in; auto: 1 when the experiment trains on GPUs "
        "or the cluster has one, else 0")
    num_cpus: float = Field(1.0, gt=0, description="CPUs of that task")
    label_selector: LabelSelector = label_selector_field("the evals' task")
    allow_training_corpus: bool = Field(
        False, description="allow evals on the training corpus (they then score rows the student trained on)")

    @field_validator("num_gpus", mode="before")
    @classmethod
    def _gpus(cls, value):
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError("must be >= 0 or 'auto'")
        return value

    def resolved_gpus(self, trains_on_gpu: bool, cluster_gpus: float) -> float:
        if self.num_gpus != "auto":
            return float(self.num_gpus)
        return 1.0 if trains_on_gpu or cluster_gpus >= 1 else 0.0


CREDENTIALS_FROM_ENV = ("credentials come from the environment or the instance role (AWS_ACCESS_KEY_ID / "
                        "AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_USERNAME / _PASSWORD or MLFLOW_TRACKING_TOKEN), "
                        "never from a config")


CREDENTIALS_IN_URI = ("put MLflow credentials in MLFLOW_TRACKING_USERNAME / _PASSWORD or MLFLOW_TRACKING_TOKEN, "
                      "not in the URI")


class TrackingConfig(BaseModel):
    """The ``tracking:`` section of an experiment config."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False)

    uri: str | None = Field(None, description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI; neither: off")
    experiment_name: str = Field("wand-tts", description="MLflow experiment holding the runs")
    log_student: bool = Field(True, description=(
        "log the final student as an MLflow model of the parent run (pyfunc: generates with WAND) and register it"))
    registered_model: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description=(
        "the registered model the student becomes a version of; None: wand-<model>, one per family"))
    champion_alias: str = Field("champion", pattern=r"^[a-z][a-z0-9_-]{0,63}$", description=(
        "the alias moved to a version only when every eval gate passes (pipeline/evals/gates.py)"))
    grace_s: float = Field(300.0, ge=0, description=(
        "how long the driver waits for an MLflow server that does not answer (restarting, unreachable) "
        "before the job fails naming the tracking URI; the checkpoints are kept, so resubmitting resumes"))

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        if value and has_credentials(value):  # said before the value can reach a log or a param
            raise ValueError(CREDENTIALS_IN_URI)
        return value

    def resolved_uri(self) -> str | None:
        uri = self.uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri and has_credentials(uri):
            raise ValueError(f"tracking.uri: {CREDENTIALS_IN_URI}")
        return uri


def section(name: str, source: type[BaseModel], fields: tuple[str, ...], doc: str) -> type[BaseModel]:
    """A config class of ``source``'s own field definitions (type, default, limits, description): a
    fact is defined once, in the stage config that uses it, and the experiment config reuses it."""
    picked = {n: (source.model_fields[n].annotation, source.model_fields[n]) for n in fields}
    model = create_model(name, __config__=ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False), **picked)
    model.__doc__ = doc
    return model


# The facts every step shares sit at the top of an experiment; each stage's own settings in its section.
SHARED = ("experiment", "model", "model_size", "teacher_source", "teacher_seed", "corpus", "shards", "storage",
          "s3_endpoint")


CURRICULUM = ("stages", "epochs", "window_start", "window_target", "tau_start", "tau_end", "lr", "warmup_fraction",
              "hold_fraction")


PRECOMPUTE = tuple(n for n in PrecomputeConfig.model_fields if n not in SHARED)


TRAIN = tuple(n for n in TrainConfig.model_fields if n not in SHARED + CURRICULUM + ("k", "temperature"))


_SOURCES = {"corpus": PrecomputeConfig}


Shared = create_model("Shared", __config__=ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False), **{
    n: (cls.model_fields[n].annotation, cls.model_fields[n])
    for n in SHARED for cls in [_SOURCES.get(n, TrainConfig)]})


PrecomputeSection = section("PrecomputeSection", PrecomputeConfig, PRECOMPUTE,
                            "The teacher top-k stage (pipeline.data.precompute): k, temperature, shards, actors.")


CurriculumSection = section("CurriculumSection", TrainConfig, CURRICULUM,
                            "The schedule: stages, epochs, W from window_start to window_target, tau, lr.")


TrainSection = section("TrainSection", TrainConfig, TRAIN,
                       "The student's training: batch, loss, DeepSpeed ZeRO, workers, checkpoints, row order.")


SECTION_OF = {**{n: "precompute" for n in PRECOMPUTE}, **{n: "curriculum" for n in CURRICULUM},
              **{n: "train" for n in TRAIN}}


class DistillConfig(Shared):
    """One experiment: the shared facts (model and teacher, data and storage) at the top, then one
    typed section per step. The stage configs (``PrecomputeConfig``, ``TrainConfig``) are derived from
    it, never written by hand; errors name the section (``precompute.k``, ``curriculum.stages``)."""

    precompute: PrecomputeSection = Field(default_factory=PrecomputeSection)
    curriculum: CurriculumSection = Field(default_factory=CurriculumSection)
    train: TrainSection = Field(default_factory=TrainSection)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _sections(self) -> "DistillConfig":
        for field, value in flatten(self.model_dump()).items():  # configs get logged: no credentials in them
            if isinstance(value, str) and has_credentials(value):
                raise ValueError(f"{field}: a URL with user-info (user:password@) or a credential in its query "
                                 f"(password=, token=, sig=, X-Amz-*): {CREDENTIALS_FROM_ENV}")
        held_out = self.evaluate.corpus
        if self.evaluate.enabled and not self.evaluate.allow_training_corpus and (
                held_out is None or storage.overlaps(held_out, self.corpus)):
            raise ValueError(
                "evaluate.corpus: the evals would score the training corpus (rows the student learned); "
                "point evaluate.corpus at held-out rows, or set evaluate.allow_training_corpus: true")
        self.precompute_config()
        self.train_config()
        return self

    @property
    def temperature(self) -> float:
        return self.precompute.temperature

    def precompute_config(self) -> PrecomputeConfig:
        shared = self.model_dump(include=set(PrecomputeConfig.model_fields) & set(SHARED))
        return _typed(PrecomputeConfig, {**shared, **self.precompute.model_dump()})

    def train_config(self) -> TrainConfig:
        shared = self.model_dump(include=set(TrainConfig.model_fields) & set(SHARED))
        return _typed(TrainConfig, {**shared, **self.curriculum.model_dump(), **self.train.model_dump(),
                                    "k": self.precompute.k, "temperature": self.precompute.temperature})


def _typed(model: type[BaseModel], values: dict):
    """A stage config; its cross-field errors are named by the section the field sits in."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        where = f"{SECTION_OF[field]}.{field}" if field in SECTION_OF else field
        message = first["msg"].removeprefix("Value error, ")
        if not where:  # a cross-field check: its message opens with the field it is about
            name = re.match(r"\w+", message)
            if name and name.group() in SECTION_OF:
                raise ValueError(f"{SECTION_OF[name.group()]}.{message}") from None
        raise ValueError(f"{where}: {message}" if where else message) from None
