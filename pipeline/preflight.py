"""What an entry point checks before it starts Ray or writes anything: the inputs an experiment
names (corpus files and their schema, the teacher's files, the held-out corpus) and, once Ray is
up, that the cluster can ever hold what the config asks for.

Each check returns problem lines (``field: what is wrong``) instead of raising, so a user sees
every problem of a config at once; ``pipeline.cli.prepare`` prints them and exits 2.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from pipeline import resources, storage
from pipeline.data.corpus_io import corpus_files
from pipeline.resources import RayRequest

__all__ = ["check_inputs", "check_resources", "STEPS"]

log = logging.getLogger("wand.preflight")
STEPS = ("precompute", "train", "evaluate")
CORPUS_COLUMNS = {"id": "a string", "input_ids": "a list of integers", "prefix_length": "an integer"}


def check_inputs(config, steps: tuple[str, ...] = STEPS) -> list[str]:
    """Problems with the files ``config`` names for ``steps`` (the precompute reads the corpus and
    the teacher; training the teacher again for stage 1; the evals the held-out corpus)."""
    problems: list[str] = []
    paths = [config.corpus, config.shards, config.storage, config.teacher_source,
             config.evaluate.corpus if config.evaluate.enabled else None]
    try:
        storage.require_credentials(*[p for p in paths if p])
    except storage.StorageError as err:
        return [str(err)]
    if "precompute" in steps:
        problems += _corpus(config.corpus, config.s3_endpoint, "corpus")
    problems += _teacher(config.teacher_source)  # every step loads the teacher (the evals compare against it)
    if "evaluate" in steps and config.evaluate.enabled and config.evaluate.corpus:
        problems += _corpus(config.evaluate.corpus, config.s3_endpoint, "evaluate.corpus")
    return problems


def _corpus(uri: str, endpoint: str | None, field: str) -> list[str]:
    try:
        fs, _ = storage.resolve(uri, endpoint)
        files = corpus_files(uri, endpoint, field)
    except FileNotFoundError:
        return [f"{field}: no such file or folder: {uri}"]
    except ValueError as err:  # an unfinished build, or a manifest naming files that are gone
        return [str(err)]
    except OSError as err:
        return [f"{field}: {uri} cannot be listed ({str(err)[:200]})"]
    if not files:
        return [f"{field}: no .parquet or .jsonl files under {uri}"]
    problems = []
    import pyarrow.parquet as pq

    for name in [f for f in files if f.endswith(".parquet")][:64]:  # a schema read is a footer read: cheap
        try:
            schema = pq.read_schema(name, filesystem=fs)
        except (OSError, pa.ArrowException) as err:
            problems.append(f"{field}: {name} is not a readable Parquet file ({str(err)[:160]})")
            continue
        for column, what in CORPUS_COLUMNS.items():
            if column not in schema.names:
                problems.append(f"{field}: {name} lacks the column '{column}' ({what} per row)")
                continue
            kind = schema.field(column).type
            ok = {"id": pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind),
                  "input_ids": (pa.types.is_list(kind) or pa.types.is_large_list(kind))
                  and pa.types.is_integer(kind.value_type),
                  "prefix_length": pa.types.is_integer(kind)}[column]
            if not ok:
                problems.append(f"{field}: {name}: column '{column}' is {kind}, expected {what}")
    return problems


def _teacher(source: str | None) -> list[str]:
    """A local teacher path must exist (an ``org/name`` that is no folder here is a hub id; s3://
    sources are checked when they are fetched, with the credentials checked above)."""
    if not source or storage.is_remote(source):
        return []
    import os

    if os.path.exists(os.path.expanduser(source)):
        return []
    if source.startswith(("/", ".", "~")) or source.count("/") != 1:
        return [f"teacher_source: no such file or directory: {source} (a local folder or file, s3://bucket/path, "
                "or a Hugging Face id org/name)"]
    return []


def demands(config, gpus_in_cluster: float = 0.0) -> dict[str, RayRequest]:
    """What each step of an experiment asks Ray for (``pipeline.resources``: the steps' own requests):
    the precompute's teacher actors, the training workers, the evals' task when the evals run."""
    train = config.train_config()
    out = {"precompute": resources.precompute(config.precompute_config()), "train": resources.train(train)}
    if config.evaluate.enabled:
        out["evaluate"] = resources.evaluate(config.evaluate, train.use_gpu, gpus_in_cluster)
    return out


# The config fields behind each step's request, for the messages.
REQUEST_FIELDS = {"precompute": {"CPU": "precompute.num_cpus_per_actor", "GPU": "precompute.num_gpus_per_actor"},
                  "train": {"CPU": "train.cpus_per_worker x train.num_workers",
                            "GPU": "train.num_workers (one GPU each, train.use_gpu)"},
                  "evaluate": {"CPU": "evaluate.num_cpus", "GPU": "evaluate.num_gpus"}}


def check_labels(config, steps: tuple[str, ...] = STEPS, local: bool = True) -> list[str]:
    """Label selectors that no node of the running cluster matches (problems on a cluster this job
    started; warnings on a joined one, whose autoscaler may add a labelled node)."""
    import ray

    labels = [n.get("Labels", {}) for n in ray.nodes() if n.get("Alive")]
    problems = []
    for step, request in demands(config).items():
        selector = request.labels
        if step not in steps or not selector or any(all(node.get(k) == v for k, v in selector.items())
                                                    for node in labels):
            continue
        _report(problems, local, f"{step}.label_selector {selector}: no node of this Ray cluster has these labels; "
                "it would wait forever (cluster/ node types carry wand-role; see docs/cluster.md)", "has them")
    return problems


def _report(problems: list[str], local: bool, line: str, unless: str) -> None:
    """A request no node can serve: a problem on a cluster this job started (nothing will be added),
    a warning on a joined one (its autoscaler may add a node that ``unless`` says)."""
    if local:
        problems.append(line)
    else:
        log.warning("%s (unless the autoscaler adds a node that %s)", line, unless)


def check_resources(config, steps: tuple[str, ...] = STEPS, local: bool = True) -> list[str]:
    """Requests of ``config`` that no node of the running cluster can hold. On a cluster this job
    started (``local``) nothing will ever be added, so they are problems; on a joined cluster an
    autoscaler may still add a node that fits, so they are logged as warnings and not returned."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    largest = {key: max((n.get(key, 0.0) for n in nodes), default=0.0) for key in ("CPU", "GPU")}
    total = ray.cluster_resources()
    requests = []
    for step, request in demands(config, total.get("GPU", 0.0)).items():
        if step not in steps:
            continue
        # A stage's workers may spread over nodes (the cluster must hold them all); an actor or a task
        # sits on one node (some node must hold it).
        spread = step == "train"
        for resource in ("CPU", "GPU"):
            amount = request.bundle.get(resource, 0.0) * (request.count if spread else 1)
            if amount:
                requests.append((REQUEST_FIELDS[step][resource], resource, amount, total if spread else largest))
    problems = []
    for field, resource, amount, available in requests:
        have = available.get(resource, 0.0)
        if amount > have + 1e-9:
            where = "any node" if available is largest else "the whole cluster"
            _report(problems, local, f"{field}: asks for {amount:g} {resource}, but {where} of this Ray cluster has "
                    f"{have:g}; it would wait forever", "fits")
    return problems + check_labels(config, steps, local)
